"""Pseudo-label maths as pure functions: arrays and tables in, named tables out.

Why pure: these few functions decide what the student learns. Keeping them free of models, files
and global state makes each one testable against hand-computed values and lets the report replay
them over a threshold sweep. Raw teacher probabilities are stored by the cycle; temperature,
thresholds and balancing are applied here, when the student's targets are built (as in the
reference noisy-student code).
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd

LabelMode = Literal["multiclass", "multilabel"]


def _check_probs(probs: np.ndarray, name: str = "probs") -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"{name} must be (N, C), got shape {probs.shape}")
    if probs.size and (np.isnan(probs).any() or probs.min() < 0 or probs.max() > 1):
        raise ValueError(f"{name} must hold probabilities in [0, 1] without NaN")
    return probs


def sharpen(probs: np.ndarray, *, temperature: float, mode: LabelMode) -> np.ndarray:
    """Temperature-scale stored probabilities (T < 1 sharpens, T > 1 softens, T = 1 is identity).

    Multiclass: p_c^(1/T) renormalised (the softmax of log p / T). Multilabel: each class on its own,
    sigmoid(logit(p) / T).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = _check_probs(probs)
    if temperature == 1:
        return probs.astype(np.float32)
    eps = 1e-7
    p = np.clip(probs, eps, 1 - eps)
    if mode == "multiclass":
        logits = np.log(p) / temperature
        logits -= logits.max(axis=1, keepdims=True)
        out = np.exp(logits)
        return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)
    logits = np.log(p / (1 - p)) / temperature
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def hard_labels(probs: np.ndarray, *, mode: LabelMode) -> np.ndarray:
    """One-hot argmax (multiclass) or p >= 0.5 (multilabel), as float32 targets."""
    probs = _check_probs(probs)
    if mode == "multiclass":
        out = np.zeros_like(probs, dtype=np.float32)
        out[np.arange(len(probs)), probs.argmax(axis=1)] = 1
        return out
    return (probs >= 0.5).astype(np.float32)


def confidence_of(probs: np.ndarray, *, mode: LabelMode) -> np.ndarray:
    """How sure the teacher is: the top probability (multiclass) or the least certain class's
    distance from 0.5, mapped back to [0.5, 1] (multilabel: an image is only as sure as its
    most doubtful class)."""
    probs = _check_probs(probs)
    if mode == "multiclass":
        return probs.max(axis=1)
    return 0.5 + np.abs(probs - 0.5).min(axis=1)


def blend_targets(ground_truth: np.ndarray, oof_probs: np.ndarray, *, weight: float) -> np.ndarray:
    """Student targets of labeled images: (1 - weight) * ground truth + weight * OOF soft label.

    The OOF soft label comes from a model that never saw the image, so blending it in softens
    confidently wrong labels without leaking the image's own label back into its target.
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"labeled_blend weight must be in [0, 1], got {weight}")
    gt = _check_probs(ground_truth, "ground_truth")
    oof = _check_probs(oof_probs, "oof_probs")
    if gt.shape != oof.shape:
        raise ValueError(f"ground truth {gt.shape} and OOF {oof.shape} shapes differ")
    return ((1 - weight) * gt + weight * oof).astype(np.float32)


def precision_curve(scores: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """Precision and recall of "keep everything scoring >= t" for every distinct score t.

    Returns a table sorted by descending threshold with columns threshold, kept, true_positives,
    precision, recall (recall relative to the correct items among those scored).
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape:
        raise ValueError("scores and correct must have the same length")
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    tp = np.cumsum(c)
    kept = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # one row per distinct score
    total = max(int(c.sum()), 1)
    return pd.DataFrame(
        {"threshold": s[last], "kept": kept[last], "true_positives": tp[last],
         "precision": tp[last] / kept[last], "recall": tp[last] / total}
    )


def precision_threshold(scores: np.ndarray, correct: np.ndarray, *, target_precision: float) -> float:
    """Lowest threshold whose kept set reaches ``target_precision``; +inf when none does.

    "Lowest" maximises recall under the precision constraint; the curve is read on out-of-fold
    predictions, where the truth is known.
    """
    if not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    curve = precision_curve(scores, correct)
    ok = curve[curve["precision"] >= target_precision]
    return float(ok["threshold"].min()) if len(ok) else float("inf")


def class_thresholds(oof_probs: np.ndarray, y_true: np.ndarray, *, target_precision: float, mode: LabelMode) -> np.ndarray:
    """Per-class confidence thresholds reaching ``target_precision`` on OOF predictions.

    Multiclass: for class c, the images predicted c (argmax), scored by p_c, correct when the true
    argmax is c. Multilabel: all images, scored by p_c, correct when class c is present.
    """
    probs = _check_probs(oof_probs, "oof_probs")
    truth = np.asarray(y_true, dtype=np.float64)
    out = np.full(probs.shape[1], np.inf)
    for c in range(probs.shape[1]):
        if mode == "multiclass":
            predicted = probs.argmax(axis=1) == c
            correct = truth[predicted].argmax(axis=1) == c
            scores = probs[predicted, c]
        else:
            scores, correct = probs[:, c], truth[:, c] >= 0.5
        if len(scores):
            out[c] = precision_threshold(scores, correct, target_precision=target_precision)
    return out


def select_pseudo(
    image_ids: Sequence[str],
    probs: np.ndarray,
    *,
    mode: LabelMode,
    class_names: Sequence[str],
    confidence: float = 0.5,
    thresholds: np.ndarray | None = None,
) -> pd.DataFrame:
    """Decide which unlabeled images are confident enough to teach the student.

    Returns one row per image: image_id, label (predicted class name; multilabel: '|'-joined
    positives or 'none'), class_index (argmax), confidence, threshold and kept. With per-class
    ``thresholds`` (from :func:`class_thresholds`) the predicted class's threshold applies;
    otherwise the global ``confidence``.
    """
    probs = _check_probs(probs)
    if len(image_ids) != len(probs):
        raise ValueError(f"{len(image_ids)} image ids for {len(probs)} probability rows")
    top = probs.argmax(axis=1)
    conf = confidence_of(probs, mode=mode)
    if thresholds is not None:
        thr = np.asarray(thresholds, dtype=np.float64)[top]
        kept = probs[np.arange(len(probs)), top] >= thr
    else:
        thr = np.full(len(probs), confidence)
        kept = conf >= thr
    if mode == "multiclass":
        labels = [class_names[i] for i in top]
    else:
        labels = ["|".join(class_names[c] for c in np.flatnonzero(row >= 0.5)) or "none" for row in probs]
    return pd.DataFrame(
        {"image_id": list(image_ids), "label": labels, "class_index": top, "confidence": conf,
         "threshold": thr, "kept": kept}
    )


def threshold_support(oof_probs: np.ndarray, *, mode: LabelMode) -> np.ndarray:
    """How many OOF predictions each class's threshold is read from (see :func:`class_thresholds`):
    multiclass, the images predicted as the class; multilabel, every image."""
    probs = _check_probs(oof_probs, "oof_probs")
    if mode == "multiclass":
        return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) if len(probs) else np.zeros(probs.shape[1], int)
    return np.full(probs.shape[1], len(probs))


def starving_classes(selection: pd.DataFrame, support: np.ndarray, *, num_classes: int,
                     min_support: int, present: Sequence[int] | None = None) -> dict[int, str]:
    """Classes the student would learn nothing about, or only on weak evidence: class -> why.

    A class starves when it keeps no pseudo label, or when its threshold rests on fewer than
    ``min_support`` OOF predictions (a precision read off a handful of images means nothing: a
    threshold chosen on one OOF image keeps everything or nothing by chance). Only the classes
    ``present`` in the labeled data can starve (default: all); the others have nothing to teach.
    """
    kept = selection.loc[selection["kept"].astype(bool), "class_index"].to_numpy(int)
    counts = np.bincount(kept, minlength=num_classes)
    out = {}
    for c in (range(num_classes) if present is None else sorted(present)):
        if support[c] < min_support:
            out[c] = f"threshold rests on {int(support[c])} OOF prediction(s) (< {min_support})"
        elif counts[c] == 0:
            out[c] = "no pool image reaches its threshold"
    return out


def top_k_fallback(selection: pd.DataFrame, classes: Sequence[int], *, k: int) -> pd.DataFrame:
    """Noisy Student's rule for a starving class: keep its ``k`` most confident pool images.

    Only images predicted as the class (``class_index``) are candidates, so no image changes its
    label. Returns the selection with a ``rule`` column: "threshold" (or "confidence") for rows
    decided by the threshold, "top_k" for the rows this fallback decided.
    """
    out = selection.copy()
    if "rule" not in out.columns:
        out["rule"] = np.where(out["kept"].astype(bool), "threshold", "")
    for c in classes:
        mine = out[out["class_index"] == c].sort_values(["confidence", "image_id"], ascending=[False, True])
        chosen = mine.index[: max(0, int(k))]
        out.loc[mine.index, "kept"] = False
        out.loc[mine.index, "rule"] = ""
        out.loc[chosen, "kept"] = True
        out.loc[chosen, "rule"] = "top_k"
    return out


def fallback_size(selection: pd.DataFrame, starving: Sequence[int], *, fixed: int = 0) -> int:
    """How many images a starving class gets: ``fixed`` if > 0, else the median kept count of the
    classes that are not starving (at least 1) -- what balancing would bring them to anyway."""
    if fixed > 0:
        return int(fixed)
    kept = selection[selection["kept"].astype(bool) & ~selection["class_index"].isin(list(starving))]
    counts = kept.groupby("class_index").size()
    return max(1, int(np.median(counts.to_numpy()))) if len(counts) else 1


def balance_classes(selection: pd.DataFrame, *, per_class: int = 0, seed: int = 0) -> pd.DataFrame:
    """Noisy-Student class balancing of the kept pseudo labels.

    Classes with more than ``per_class`` kept images keep their most confident ones; classes with
    fewer are duplicated (whole copies first, then a seeded sample of the remainder). ``per_class``
    0 means the median kept count. Returns the kept rows with a ``copies`` column (how many times
    the student sees the image) -- a sampling weight, so nothing is physically duplicated on disk.
    """
    kept = selection[selection["kept"]].copy()
    if kept.empty:
        return kept.assign(copies=pd.Series(dtype="int64"))
    counts = kept.groupby("label").size()
    target = int(per_class) if per_class > 0 else max(1, int(np.median(counts.to_numpy())))
    rng = np.random.default_rng(seed)
    parts = []
    for label, group in kept.groupby("label", sort=True):
        group = group.sort_values(["confidence", "image_id"], ascending=[False, True])
        if len(group) >= target:
            parts.append(group.head(target).assign(copies=1))
            continue
        copies = np.full(len(group), target // len(group))
        extra = rng.choice(len(group), size=target % len(group), replace=False)
        copies[extra] += 1
        parts.append(group.assign(copies=copies))
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


def labeled_share_weights(is_pseudo, *, share: float) -> np.ndarray | None:
    """Draw weights giving ground-truth images ``share`` of a student's draws and pseudo-labeled
    (or pseudo-masked) ones the rest, each image equally likely within its kind; None (uniform,
    every image once per epoch) when ``share`` is 0 or one kind is absent.

    Why: at matched optimizer steps, pseudo labels dilute the labeled images -- with as many
    pseudo as labeled images a student sees each labeled one half as often as the ablation does.
    """
    pseudo = np.asarray(is_pseudo, bool)
    n_pseudo, n_true = int(pseudo.sum()), int((~pseudo).sum())
    if share <= 0 or not n_pseudo or not n_true:
        return None
    if not 0 < share < 1:
        raise ValueError(f"labeled share must be in [0, 1), got {share}")
    return np.where(pseudo, (1 - share) / n_pseudo, share / n_true)


def pseudo_targets(probs: np.ndarray, *, mode: LabelMode, target: Literal["soft", "hard"], temperature: float) -> np.ndarray:
    """The student's targets for pseudo-labeled images, built from stored raw probabilities."""
    if target == "hard":
        return hard_labels(probs, mode=mode)
    return sharpen(probs, temperature=temperature, mode=mode)


def box_thresholds(matched: pd.DataFrame, *, num_classes: int, target_precision: float) -> np.ndarray:
    """Per-class pseudo-box score thresholds reaching ``target_precision`` on OOF boxes.

    Args:
        matched: OOF predicted boxes with columns class_id, score and true_positive (matched to a
            ground-truth box of the same class at the metric's IoU; see loops.det_metrics).
    Returns:
        (num_classes,) thresholds; +inf for a class whose precision never reaches the target
        (including classes with no OOF prediction), so no pseudo box of that class is kept.
    """
    out = np.full(num_classes, np.inf)
    for c, group in matched.groupby("class_id"):
        if 0 <= int(c) < num_classes:
            out[int(c)] = precision_threshold(group["score"].to_numpy(), group["true_positive"].to_numpy(bool),
                                              target_precision=target_precision)
    return out


def box_threshold_support(matched: pd.DataFrame, thresholds: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Per class, the OOF boxes its threshold's precision was read off: those scoring at or above
    a finite threshold (all of the class's OOF boxes where no threshold reaches the target).

    Why not every OOF box of the class: a threshold of 0.19 read off the 5 boxes above it promises
    its precision on 5 boxes, however many boxes sit below it (measured on the demo: 5 of 59; the
    pool then kept that class at 0.46 precision against a target of 0.8)."""
    out = np.zeros(num_classes, int)
    if not len(matched):
        return out
    cls, score = matched["class_id"].to_numpy(int), matched["score"].to_numpy(float)
    thr = np.asarray(thresholds, dtype=np.float64)
    for c in range(num_classes):
        mine = cls == c
        out[c] = int((mine & (score >= thr[c])).sum()) if np.isfinite(thr[c]) else int(mine.sum())
    return out


def box_starving_classes(support: np.ndarray, kept: pd.DataFrame, *, num_classes: int,
                         min_support: int, present: Sequence[int] | None = None) -> dict[int, str]:
    """Box classes the student would learn nothing about, or only on weak evidence: class -> why
    (no kept pseudo box, or a threshold read from fewer than ``min_support`` OOF boxes, counted by
    :func:`box_threshold_support`). Only the classes ``present`` in the ground truth can starve (default: all)."""
    counts = np.bincount(kept["class_id"].to_numpy(int), minlength=num_classes) if len(kept) else np.zeros(num_classes, int)
    out = {}
    for c in (range(num_classes) if present is None else sorted(present)):
        if support[c] < min_support:
            out[c] = f"threshold rests on {int(support[c])} OOF box(es) (< {min_support})"
        elif counts[c] == 0:
            out[c] = "no pool box reaches its threshold"
    return out


def box_fallback_thresholds(fused: pd.DataFrame, kept: pd.DataFrame, thresholds: np.ndarray, starving: Sequence[int], *,
                            fallback: str, k: int = 0) -> np.ndarray:
    """The thresholds a selection uses once its starving classes are known: ``top_k`` keeps each
    starving class's ``k`` highest-scoring pool boxes (0: the median kept count of the other
    classes), ``drop`` keeps none of them (+inf), ``none`` leaves the thresholds as read on OOF."""
    if not starving or fallback == "none":
        return thresholds
    if fallback == "drop":
        used = np.asarray(thresholds, dtype=np.float64).copy()
        used[list(starving)] = np.inf
        return used
    if fallback != "top_k":
        raise ValueError(f"box fallback must be 'top_k', 'none' or 'drop', got {fallback!r}")
    counts = kept.groupby("class_id").size().drop(list(starving), errors="ignore") if len(kept) else pd.Series(dtype=int)
    size = k or (max(1, int(np.median(counts.to_numpy()))) if len(counts) else 1)
    return top_k_box_thresholds(fused, thresholds, list(starving), k=size)


def top_k_box_thresholds(fused: pd.DataFrame, thresholds: np.ndarray, classes: Sequence[int], *, k: int) -> np.ndarray:
    """Thresholds that keep the ``k`` highest-scoring pool boxes of each listed class (the box
    form of Noisy Student's top-K rule for a starving class); +inf where the class has no box."""
    out = np.asarray(thresholds, dtype=np.float64).copy()
    for c in classes:
        scores = np.sort(fused.loc[fused["class_id"].to_numpy(int) == c, "score"].to_numpy(np.float64))[::-1]
        out[c] = scores[min(k, len(scores)) - 1] if len(scores) and k > 0 else np.inf
    return out


def select_pseudo_boxes(
    fused: pd.DataFrame,
    image_ids: Sequence[str],
    p_abnormal: pd.Series,
    *,
    thresholds: np.ndarray,
    negative_max_p_abnormal: float,
    uncertain_floor: float = 0.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Turn fused teacher boxes on unlabeled images into detector training targets.

    An image keeps the boxes whose score reaches their class threshold. Why an image-level rule on
    top: a detector reads every unlabeled region of a training image as background, so an image
    whose teacher saw a lesion it was unsure of (a box scoring at least ``uncertain_floor`` but
    below its class threshold) would teach the student that the lesion is background; such an
    image is "partial" and left out, whatever else it keeps. An image with no box at all from the
    floor up becomes a negative (an empty label file) only when the classifier is confidently
    normal (P(abnormal) <= ``negative_max_p_abnormal``); otherwise it is "uncertain" and left out.
    ``uncertain_floor`` 0 turns the partial rule off (any kept box makes an image usable).

    Returns:
        (boxes, images): the kept boxes of usable images (input columns kept), and one row per
        image with image_id, status ("boxes" | "negative" | "partial" | "uncertain"), n_boxes
        (kept boxes), n_unsure (boxes between the floor and their threshold), p_abnormal.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    scores = fused["score"].to_numpy(np.float64) if len(fused) else np.zeros(0)
    keep = scores >= thresholds[fused["class_id"].to_numpy(int)] if len(fused) else np.zeros(0, bool)
    unsure = ~keep & (scores >= uncertain_floor) if uncertain_floor > 0 else np.zeros(len(fused), bool)
    n_kept = fused[keep].groupby("image_id").size() if keep.any() else pd.Series(dtype="int64")
    n_unsure = fused[unsure].groupby("image_id").size() if unsure.any() else pd.Series(dtype="int64")
    rows = []
    for image_id in image_ids:
        n, u = int(n_kept.get(image_id, 0)), int(n_unsure.get(image_id, 0))
        p = float(p_abnormal.get(image_id, np.nan))
        if u:
            status = "partial" if n else "uncertain"
        else:
            status = "boxes" if n else ("negative" if p <= negative_max_p_abnormal else "uncertain")
        rows.append({"image_id": image_id, "status": status, "n_boxes": n, "n_unsure": u, "p_abnormal": p})
    images = pd.DataFrame(rows, columns=["image_id", "status", "n_boxes", "n_unsure", "p_abnormal"])
    usable = set(images.loc[images["status"] == "boxes", "image_id"])
    boxes = fused[keep & fused["image_id"].isin(usable).to_numpy()].reset_index(drop=True) if len(fused) else fused.copy()
    return boxes, images


def gate_predictions(
    boxes: pd.DataFrame,
    p_abnormal: pd.Series,
    *,
    no_finding_class: int,
    low: float,
    high: float,
    mode: Literal["hard", "soft", "off"] = "hard",
) -> pd.DataFrame:
    """Gate detector boxes with the classifier's P(abnormal), VinBigData style.

    hard: below ``low`` only a "No finding" prediction (full-image box, score 1); between ``low``
    and ``high`` the boxes stay and "No finding" is appended with score 1 - P(abnormal); from
    ``high`` up the boxes stand alone. soft: every box score is multiplied by P(abnormal) and
    "No finding" is appended with 1 - P(abnormal). off: boxes unchanged. The "No finding" row uses
    class id ``no_finding_class`` and box (0, 0, 1, 1); submission writers map it to the
    competition's form (VinBigData "14 1 0 0 1 1", SIIM "none 1 0 0 1 1").

    Args:
        boxes: predicted boxes (image_id, class_id, x_min..y_max, score, ...).
        p_abnormal: P(abnormal) per image_id; every image to gate must be in it.
    """
    if not 0 <= low <= high <= 1:
        raise ValueError(f"gate thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
    if mode == "off":
        return boxes.reset_index(drop=True)
    p = p_abnormal.astype(float)
    out = boxes[boxes["image_id"].isin(p.index)].copy()
    out["score"] = out["score"].astype(np.float64)
    if mode == "hard":
        out = out[out["image_id"].map(p).to_numpy() >= low]
        needs_nf = p[p < high]
        nf_score = np.where(needs_nf < low, 1.0, 1.0 - needs_nf)
    else:
        out["score"] = out["score"] * out["image_id"].map(p).to_numpy()
        needs_nf = p
        nf_score = 1.0 - needs_nf.to_numpy()
    no_finding = pd.DataFrame({"image_id": needs_nf.index, "class_id": no_finding_class, "x_min": 0.0, "y_min": 0.0,
                               "x_max": 1.0, "y_max": 1.0, "score": nf_score})
    return pd.concat([out, no_finding], ignore_index=True).sort_values(["image_id", "score"], ascending=[True, False],
                                                                       kind="stable").reset_index(drop=True)
