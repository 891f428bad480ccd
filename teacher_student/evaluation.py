"""How good the pseudo labels were, against the pool's hidden truth (runs that have one).

The demo (and any dataset with ``unlabeled_truth``) knows the true labels of its unlabeled pool.
They are for measuring only: these functions run after selection, their numbers go to the
pseudo-label records, the summary and the report, and nothing that selects or trains reads them.
The selection stage and the report both call these, so a precision is computed one way only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..datasets.adapters import training_boxes
from ..datasets.table import ItemTable
from ..loops.det_metrics import true_positive_mask


def _kept_with_truth(selection: pd.DataFrame, truth: ItemTable) -> pd.DataFrame:
    known = truth.items.set_index("image_id")["has_study_label"]
    return selection[selection["kept"].astype(bool) & selection["image_id"].map(lambda i: bool(known.get(i, False)))]


def class_truth_precision(selection: pd.DataFrame, truth: ItemTable | None, label_mode: str) -> float | None:
    """Share of kept pseudo labels whose class agrees with the hidden truth; None without truth
    (or for multilabel data, where one class per image is not the label)."""
    if truth is None or label_mode != "multiclass":
        return None
    kept = _kept_with_truth(selection, truth)
    if kept.empty:
        return None
    true_class = truth.study_targets(kept["image_id"]).argmax(axis=1)
    return float((true_class == kept["class_index"].to_numpy()).mean())


def class_truth_precision_per_class(selection: pd.DataFrame, truth: ItemTable | None, class_names: Sequence[str],
                                    label_mode: str) -> dict[str, float]:
    """Per class, the share of kept pseudo labels naming it that the hidden truth confirms
    (multilabel: the class is truly present)."""
    if truth is None:
        return {}
    kept = _kept_with_truth(selection, truth)
    if kept.empty:
        return {}
    y = truth.study_targets(kept["image_id"])
    out = {}
    for c, name in enumerate(class_names):
        mine = class_members(kept["label"], name, label_mode).to_numpy()
        if mine.any():
            right = y[mine].argmax(axis=1) == c if label_mode == "multiclass" else y[mine, c] >= 0.5
            out[name] = float(right.mean())
    return out


def class_members(labels: pd.Series, name: str, label_mode: str) -> pd.Series:
    """Which pseudo labels name class ``name`` (multilabel labels are '|'-joined class names), as a
    boolean mask also when there are none (an empty object Series would select columns, not rows)."""
    if label_mode == "multiclass":
        return (labels == name).astype(bool)
    return labels.astype(str).str.split("|").map(lambda parts: name in parts).astype(bool)


def _box_hits(boxes: pd.DataFrame, truth: ItemTable, iou_thr: float) -> tuple[pd.DataFrame, np.ndarray]:
    known = set(truth.items.loc[truth.items["box_labeled"], "image_id"])
    boxes = boxes[boxes["image_id"].isin(known)]
    return boxes, true_positive_mask(boxes, training_boxes(truth), iou_thr=iou_thr)


def box_truth_precision(boxes: pd.DataFrame, images: pd.DataFrame, truth: ItemTable, *, iou_thr: float) -> dict:
    """Precision of kept pseudo boxes (matched to true boxes at the metric's IoU) and of the
    images declared negatives (truly without findings), over the pool images with known truth."""
    known = set(truth.items.loc[truth.items["box_labeled"], "image_id"])
    boxes, hits = _box_hits(boxes, truth, iou_thr)
    with_findings = set(training_boxes(truth)["image_id"])
    negatives = images[(images["status"] == "negative") & images["image_id"].isin(known)]["image_id"]
    return {"precision": float(np.mean(hits)) if len(boxes) else None,
            "negative_precision": float((~negatives.isin(with_findings)).mean()) if len(negatives) else None}


def box_truth_precision_per_class(boxes: pd.DataFrame, truth: ItemTable | None, box_classes: Sequence[str], *,
                                  iou_thr: float) -> dict[str, float]:
    """Per box class, the share of kept pseudo boxes (on images with hidden truth) matching a true box."""
    if truth is None or boxes is None:
        return {}
    boxes, hits = _box_hits(boxes, truth, iou_thr)
    return {box_classes[int(k)]: float(hits[(boxes["class_id"] == k).to_numpy()].mean())
            for k in sorted(boxes["class_id"].unique())}
