"""How good the pseudo labels were, against the pool's hidden truth (runs that have one).

The demo (and any dataset with ``unlabeled_truth``) knows the true labels of its unlabeled pool.
They are for measuring only: these functions run after selection, their numbers go to the
pseudo-label records, the summary and the report, and nothing that selects or trains reads them.
"""
from __future__ import annotations

import pandas as pd

from ..datasets.adapters import training_boxes
from ..datasets.table import ItemTable
from ..loops.det_metrics import true_positive_mask


def class_truth_precision(selection: pd.DataFrame, truth: ItemTable | None, label_mode: str) -> float | None:
    """Share of kept pseudo labels whose class agrees with the hidden truth; None without truth
    (or for multilabel data, where one class per image is not the label)."""
    if truth is None or label_mode != "multiclass":
        return None
    known = truth.items.set_index("image_id")["has_study_label"]
    kept = selection[selection["kept"] & selection["image_id"].map(lambda i: bool(known.get(i, False)))]
    if kept.empty:
        return None
    true_class = truth.study_targets(kept["image_id"]).argmax(axis=1)
    return float((true_class == kept["class_index"].to_numpy()).mean())


def box_truth_precision(boxes: pd.DataFrame, images: pd.DataFrame, truth: ItemTable, *, iou_thr: float) -> dict:
    """Precision of kept pseudo boxes (matched to true boxes at the metric's IoU) and of the
    images declared negatives (truly without findings), over the pool images with known truth."""
    gt = training_boxes(truth)
    known = set(truth.items.loc[truth.items["box_labeled"], "image_id"])
    boxes = boxes[boxes["image_id"].isin(known)]
    matched = boxes.assign(true_positive=true_positive_mask(boxes, gt, iou_thr=iou_thr))
    negatives = images[(images["status"] == "negative") & images["image_id"].isin(known)]["image_id"]
    return {"precision": float(matched["true_positive"].mean()) if len(matched) else None,
            "negative_precision": float((~negatives.isin(set(gt["image_id"]))).mean()) if len(negatives) else None}
