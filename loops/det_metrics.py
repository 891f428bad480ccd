"""VOC-style mean average precision for box predictions in the engine's convention.

Why our own ~60 lines rather than pycocotools: the competitions this engine targets (VinBigData
mAP@0.4, SIIM-COVID mAP@0.5) score with the PASCAL VOC recipe -- all-point interpolated AP at one
IoU threshold -- while COCOeval averages 101 fixed recall points and needs a JSON round trip with
pixel areas. The matching rule here is COCO's (each prediction, highest score first, takes the
still-unmatched ground-truth box of its class with the highest IoU >= ``iou_thr``; every GT box is
matched at most once), so with ``interpolation="coco101"`` the result equals COCOeval run with
``iouThrs=[iou_thr]`` (the test checks this on a fixture). VOC's devkit differs in one corner:
it marks a prediction whose best-IoU GT is already taken as a false positive even when another
free GT overlaps it enough; we take the free one.

Conventions: boxes are normalized xyxy, 0-based ``class_id``. Predictions on an image that has no
ground-truth box are false positives (such an image was evaluated and holds no object); images with
neither are ignored. A class with no ground-truth box has AP ``None`` and is left out of the mean.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd

from ..datasets.boxes import BOX_COLUMNS, iou_matrix

Interpolation = Literal["all", "coco101"]


def mean_average_precision(
    predictions: pd.DataFrame,
    ground_truth: pd.DataFrame,
    *,
    num_classes: int,
    iou_thr: float = 0.4,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[str] | None = None,
    interpolation: Interpolation = "all",
) -> dict:
    """mAP over images and classes.

    Args:
        predictions: image_id, class_id, x_min, y_min, x_max, y_max, score.
        ground_truth: image_id, class_id, x_min, y_min, x_max, y_max.
        num_classes: Number of box classes; class ids must lie in 0..num_classes-1.
        iou_thr: A prediction is a true positive when IoU >= this with a free GT box of its class.
        class_names: Names used as keys of the per-class dicts (default "0", "1", ...).
        image_ids: If given, only these images are evaluated (e.g. the box-labeled images of a
            fold); rows of either table on other images are not scored.
        interpolation: "all" (VOC 2010+ all-point) or "coco101" (COCOeval's 101 recall points).

    Returns:
        {"map": float | None, "per_class": {name: ap | None}, "n_gt": {name: int},
        "n_pred": {name: int}, "iou_thr": float}. "map" is None when no class has a GT box.
    """
    names = _class_names(num_classes, class_names)
    preds = _checked(predictions, "predictions", num_classes, need_score=True)
    gts = _checked(ground_truth, "ground_truth", num_classes, need_score=False)
    if image_ids is not None:
        keep = set(map(str, image_ids))
        preds, gts = preds[preds["image_id"].isin(keep)], gts[gts["image_id"].isin(keep)]
    hits = hit_flags(preds, gts, iou_thr=iou_thr)
    classes, scores = preds["class_id"].to_numpy(), preds["score"].to_numpy(np.float64)
    gt_classes = gts["class_id"].to_numpy()
    per_class, n_gt, n_pred = {}, {}, {}
    for c, name in enumerate(names):
        rows = np.flatnonzero(classes == c)
        n_gt[name], n_pred[name] = int((gt_classes == c).sum()), int(len(rows))
        if n_gt[name] == 0:
            per_class[name] = None
            continue
        image_rank = pd.factorize(preds["image_id"].to_numpy()[rows])[0]  # first appearance, as groupby(sort=False)
        per_class[name] = ranked_ap(scores[rows], hits[rows], image_rank, n_gt=n_gt[name], interpolation=interpolation)
    scored = [ap for ap in per_class.values() if ap is not None]
    return {
        "map": float(np.mean(scored)) if scored else None,
        "per_class": per_class,
        "n_gt": n_gt,
        "n_pred": n_pred,
        "iou_thr": float(iou_thr),
    }


def ranked_order(scores: np.ndarray, image_rank: np.ndarray) -> np.ndarray:
    """The precision-recall ranking of one class's predictions: by score, then image, then table order."""
    return np.lexsort((np.arange(len(scores)), image_rank, -np.asarray(scores, np.float64)))


def ap_of_ranked(tp: np.ndarray, *, n_gt: int, interpolation: Interpolation = "all") -> float:
    """AP from true-positive flags already in ranking order (0 when there is no prediction)."""
    if len(tp) == 0:
        return 0.0
    hits = np.cumsum(tp)
    return average_precision(recall=hits / n_gt, precision=hits / np.arange(1, len(tp) + 1), interpolation=interpolation)


def ranked_ap(scores: np.ndarray, hits: np.ndarray, image_rank: np.ndarray, *, n_gt: int,
              interpolation: Interpolation = "all") -> float:
    """AP of one class from its predictions' scores and true-positive flags (in table order).

    The ranking is by score, ties broken by image (``image_rank``) and then table order -- the
    order of one precision-recall curve over the images' score-sorted predictions.
    """
    order = ranked_order(scores, image_rank)
    return ap_of_ranked(np.asarray(hits, bool)[order], n_gt=n_gt, interpolation=interpolation)


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}")
    return [str(n) for n in class_names]


def _checked(df: pd.DataFrame, what: str, num_classes: int, *, need_score: bool) -> pd.DataFrame:
    """Columns present, class ids in range, no NaN: a bad table fails here with one line."""
    needed = ["image_id", "class_id", *BOX_COLUMNS] + (["score"] if need_score else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}")
    out = df[needed].copy()
    out["image_id"] = out["image_id"].astype(str)
    if out[needed[1:]].isna().any().any():
        row = int(np.flatnonzero(out[needed[1:]].isna().any(axis=1).to_numpy())[0])
        raise ValueError(f"{what}, row {row} (image {out['image_id'].iloc[row]}): NaN value")
    bad = (out["class_id"] < 0) | (out["class_id"] >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{what}, row {row} (image {out['image_id'].iloc[row]}): class_id {out['class_id'].iloc[row]} "
            f"outside 0..{num_classes - 1}"
        )
    return out


def greedy_match(pred_boxes: np.ndarray, gt_boxes: np.ndarray, *, iou_thr: float) -> np.ndarray:
    """True-positive flags for predictions given in descending score order (one image, one class).

    Each prediction takes the free GT box with the highest IoU >= ``iou_thr``; a GT box is used once.
    """
    ious = iou_matrix(pred_boxes, gt_boxes)
    free = np.ones(len(gt_boxes), dtype=bool)
    hit = np.zeros(len(pred_boxes), dtype=bool)
    for i in range(len(pred_boxes)):
        candidates = np.where(free & (ious[i] >= iou_thr), ious[i], -1.0)
        if len(candidates) and candidates.max() >= 0:
            j = int(np.argmax(candidates))
            free[j], hit[i] = False, True
    return hit


def average_precision(*, recall: np.ndarray, precision: np.ndarray, interpolation: Interpolation = "all") -> float:
    """Area under the precision envelope (precision made non-increasing in recall).

    "all": exact area over every recall step (VOC 2010+). "coco101": mean of the envelope at
    recall 0, 0.01, ..., 1 (0 beyond the highest recall reached), as COCOeval.accumulate does.
    """
    envelope = np.maximum.accumulate(np.asarray(precision, dtype=np.float64)[::-1])[::-1]
    recall = np.asarray(recall, dtype=np.float64)
    if interpolation == "coco101":
        points = np.linspace(0.0, 1.0, 101)
        idx = np.searchsorted(recall, points, side="left")
        values = np.where(idx < len(recall), envelope[np.minimum(idx, len(recall) - 1)], 0.0)
        return float(values.mean())
    if interpolation != "all":
        raise ValueError(f"interpolation must be 'all' or 'coco101', got {interpolation!r}")
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def true_positive_mask(pred: pd.DataFrame, gt: pd.DataFrame, *, iou_thr: float) -> np.ndarray:
    """Which predicted boxes match a free ground-truth box of their class and image: greedy by
    score, the rule of the mAP above. Used to choose pseudo-box thresholds on OOF and to measure
    pseudo-box precision, so those numbers agree with the metric."""
    if pred.empty:
        return np.zeros(0, dtype=bool)
    cols = ["image_id", "class_id", *BOX_COLUMNS]
    pred = pred.assign(**{c: pred[c].astype(np.float64) for c in BOX_COLUMNS})
    gt = gt[cols].assign(**{c: gt[c].astype(np.float64) for c in BOX_COLUMNS})
    return hit_flags(pred, gt, iou_thr=iou_thr)


def hit_flags(pred: pd.DataFrame, gt: pd.DataFrame, *, iou_thr: float) -> np.ndarray:
    """True-positive flag of every prediction (table order; boxes in the dtypes given): per (image,
    class), predictions by descending score (ties: table order) each take the best free GT box.
    One pass over the groups, positions not labels: linear in the number of boxes."""
    hits = np.zeros(len(pred), dtype=bool)
    if pred.empty:
        return hits
    gt = gt[gt["image_id"].isin(set(pred["image_id"]))]
    gt_xyxy, pred_xyxy = gt[BOX_COLUMNS].to_numpy(), pred[BOX_COLUMNS].to_numpy()
    score = pred["score"].to_numpy(np.float64)
    gt_rows = gt.groupby(["image_id", "class_id"]).indices if len(gt) else {}
    no_gt = np.zeros((0, 4), dtype=gt_xyxy.dtype)
    for key, rows in pred.groupby(["image_id", "class_id"]).indices.items():
        if key not in gt_rows:
            continue  # no GT box of this class on this image: every prediction is a false positive
        rows = rows[np.argsort(-score[rows], kind="mergesort")]
        hits[rows] = greedy_match(pred_xyxy[rows], gt_xyxy[gt_rows[key]] if key in gt_rows else no_gt, iou_thr=iou_thr)
    return hits
