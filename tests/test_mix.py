"""CutMix of dense targets (augment.mix): the pasted rectangle moves image and mask alike, the
weights are area-weighted, the draws are reproducible, and the segmenter's trainer applies it."""
import numpy as np
import pytest
import torch

from cxr_noisy_student.augment.mix import cutmix_batch, cutmix_boxes, paste_boxes


def _batch():
    images = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 4).clone()  # sample i is all i
    masks = torch.zeros(3, 1, 4, 4)
    masks[1] = 1.0                                                          # only sample 1 is foreground
    return images, masks, torch.tensor([1.0, 0.5, 1.0])


def test_paste_moves_the_partner_pixels_and_mask_and_weighs_by_area():
    images, masks, weights = _batch()
    x, m, w = paste_boxes(images, masks, weights, [(1, 0, 2, 0, 2), None, (0, 2, 4, 1, 3)])
    assert x[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m[0, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert x[2, 0].tolist() == [[2, 2, 2, 2], [2, 2, 2, 2], [2, 0, 0, 2], [2, 0, 0, 2]]
    assert torch.equal(x[1], images[1]) and torch.equal(m[1], masks[1])
    # sample 0: 4 of 16 pixels from a weight-0.5 sample: 0.75 x 1 + 0.25 x 0.5
    assert w.tolist() == pytest.approx([0.875, 0.5, 1.0])
    assert torch.equal(images, _batch()[0]) and torch.equal(masks, _batch()[1])  # inputs kept


def test_boxes_stay_inside_cover_the_asked_area_and_never_pick_the_sample_itself():
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        for i, box in enumerate(cutmix_boxes(5, 32, 48, prob=1.0, area=(0.25, 0.5), generator=g)):
            j, y0, y1, x0, x1 = box
            assert j != i and 0 <= j < 5
            assert 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 48
            assert 0.2 <= (y1 - y0) * (x1 - x0) / (32 * 48) <= 0.55


def test_prob_zero_or_a_single_sample_leaves_the_batch_alone_and_draws_repeat():
    images, masks, weights = _batch()
    g = torch.Generator().manual_seed(0)
    assert cutmix_batch(images, masks, weights, prob=0.0, generator=g)[0] is images
    assert cutmix_boxes(1, 4, 4, prob=1.0, area=(0.25, 0.5), generator=g) == [None]
    draws = [cutmix_boxes(8, 16, 16, prob=0.5, area=(0.25, 0.5), generator=torch.Generator().manual_seed(7))
             for _ in range(2)]
    assert draws[0] == draws[1] and 0 < sum(b is not None for b in draws[0]) < 8


def test_the_segmenter_trainer_mixes_its_batches():
    from cxr_noisy_student.loops.config import TrainConfig
    from cxr_noisy_student.loops.segment import SegmentationTrainer

    class Tiny(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            mask = np.zeros((1, 8, 8), np.float32)
            mask[:, : 2 * i] = 1
            return {"image": torch.full((1, 8, 8), float(i)), "mask": mask, "weight": np.float32(1), "index": i}

    seen = []
    model = torch.nn.Conv2d(1, 1, 1)
    original = model.forward
    model.forward = lambda x: (seen.append(x.clone()), original(x))[1]
    trainer = SegmentationTrainer(model, Tiny(), None, TrainConfig(epochs=1, batch_size=4, lr=1e-3), device="cpu",
                                  log=lambda *_: None, cutmix=1.0)
    batch = next(iter(trainer.loader))
    trainer.forward(batch)
    mixed = seen[-1]
    assert all(len(torch.unique(mixed[i])) == 2 for i in range(4))  # every image holds a patch of another
