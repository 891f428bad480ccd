"""Task kinds: each implements the same few functions -- plan and train one fold, predict with one
fold model, write a generation's predictions, select pseudo labels, score -- and the one cross-fit
loop (``loops.crossfit``) runs them all. ``run.tasks`` names the kinds a run trains, in order (the
study classifier first: the detector's negatives and the final gate read its P(abnormal))."""
