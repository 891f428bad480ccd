"""The final-cycle gate: scoring it with a "No finding" class, tuning it on OOF, submissions.

VinBigData scored "No finding" as a 15th class whose ground truth is a full-image box on every
image without findings; that is why gating the detector with a normal/abnormal classifier paid off
so much there. We score the same way: :func:`with_no_finding` adds that class to ground truth, and
the gate (``teacher_student.pseudo.gate_predictions``) adds it to predictions.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from ..datasets.boxes import BOX_COLUMNS, to_pixels
from ..datasets.errors import DataError
from ..loops.det_metrics import ap_of_ranked, hit_flags, mean_average_precision, ranked_order
from .pseudo import gate_predictions

LOW_GRID = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
HIGH_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)


def with_no_finding(gt: pd.DataFrame, image_ids: list[str], no_finding_class: int) -> pd.DataFrame:
    """Ground truth plus a full-image "No finding" box on every listed image without boxes."""
    empty = sorted(set(image_ids) - set(gt["image_id"]))
    nf = pd.DataFrame({"image_id": empty, "class_id": no_finding_class, "x_min": 0.0, "y_min": 0.0,
                       "x_max": 1.0, "y_max": 1.0})
    return pd.concat([gt[gt["image_id"].isin(set(image_ids))][["image_id", "class_id", *BOX_COLUMNS]], nf],
                     ignore_index=True)


def gated_map(boxes, p_abnormal, gt, image_ids, *, class_names, iou_thr, mode, low, high) -> dict:
    """mAP over box classes + "No finding" after gating (mode "off": the detector alone)."""
    nf = len(class_names)
    gated = gate_predictions(boxes[boxes["image_id"].isin(set(image_ids))], p_abnormal.loc[list(image_ids)],
                             no_finding_class=nf, low=low, high=high, mode=mode)
    return mean_average_precision(gated, with_no_finding(gt, image_ids, nf), num_classes=nf + 1, iou_thr=iou_thr,
                                  class_names=[*class_names, "No finding"], image_ids=image_ids)


def tune_gate(boxes, p_abnormal, gt, image_ids, *, class_names, iou_thr, mode) -> dict:
    """Grid-search (low, high) on OOF predictions for the best mAP including "No finding".

    The hard gate keeps or drops an image's boxes whole, so which box matches which ground truth
    does not depend on (low, high): :class:`HardGateGrid` matches once and each grid point only
    re-ranks -- the numbers of :func:`gated_map` at every point, linear in the boxes (the grid of
    full mAP evaluations took 4 minutes on 300 VinBigData images, bench/bench_scale.py).
    """
    best = {"map": -1.0}
    grid = [(lo, hi) for lo, hi in itertools.product(LOW_GRID, HIGH_GRID) if lo <= hi]
    if mode == "soft":
        grid = [(0.0, 1.0)]  # soft gating has no thresholds

        def score(lo: float, hi: float) -> float | None:
            return gated_map(boxes, p_abnormal, gt, image_ids, class_names=class_names, iou_thr=iou_thr, mode=mode,
                             low=lo, high=hi)["map"]
    else:
        score = HardGateGrid(boxes, p_abnormal, gt, image_ids, class_names=class_names, iou_thr=iou_thr).map
    for lo, hi in grid:
        m = score(lo, hi) or 0.0
        if m > best["map"] + 1e-12:
            best = {"map": m, "low": lo, "high": hi}
    return best


class HardGateGrid:
    """``gated_map(..., mode="hard", low, high)["map"]`` for many (low, high), matching boxes once.

    Per box class: the predictions in their precision-recall order (score, then image id, then
    table order: the gated table's), their true-positive flags and their image's P(abnormal); a
    gate point keeps the boxes whose image reaches ``low``. "No finding": one prediction per image
    below ``high`` (score 1 below ``low``, else 1 - P(abnormal)), a hit on every image without boxes.
    """

    def __init__(self, boxes: pd.DataFrame, p_abnormal: pd.Series, gt: pd.DataFrame, image_ids, *, class_names,
                 iou_thr: float):
        ids = [str(i) for i in image_ids]
        self.nf = len(class_names)
        self.p = p_abnormal.loc[ids].astype(float)
        truth = with_no_finding(gt, ids, self.nf)
        pred = boxes[boxes["image_id"].astype(str).isin(set(self.p.index))]
        pred = pred[["image_id", "class_id", *BOX_COLUMNS, "score"]].astype({c: np.float64 for c in [*BOX_COLUMNS, "score"]})
        pred = pred.assign(image_id=pred["image_id"].astype(str))
        if len(pred) and int(pred["class_id"].max()) >= self.nf:
            raise ValueError(f"boxes of class {int(pred['class_id'].max())}: the gate adds 'No finding' (class {self.nf}) itself")
        hits = hit_flags(pred, truth[truth["class_id"] < self.nf], iou_thr=iou_thr)
        names = np.unique(np.concatenate([pred["image_id"].to_numpy(str), np.asarray(self.p.index, dtype=str)]))
        image_rank = np.searchsorted(names, pred["image_id"].to_numpy(str))
        p_img = self.p.groupby(level=0).first().reindex(pred["image_id"]).to_numpy()
        scores, classes = pred["score"].to_numpy(), pred["class_id"].to_numpy()
        self.classes = []  # (n_gt, hits in ranking order, P(abnormal) of their images in ranking order)
        for c in range(self.nf):
            rows = np.flatnonzero(classes == c)
            n_gt = int((truth["class_id"] == c).sum())
            if n_gt:
                order = rows[ranked_order(scores[rows], image_rank[rows])]
                self.classes.append((n_gt, hits[order], p_img[order]))
        empty = set(truth.loc[truth["class_id"] == self.nf, "image_id"])
        self.nf_gt = len(empty)
        self.nf_rank = np.searchsorted(names, np.asarray(self.p.index, dtype=str))
        self.nf_hit = np.asarray([i in empty for i in self.p.index], bool)
        self.p_values = self.p.to_numpy()

    def map(self, low: float, high: float) -> float | None:
        if not 0 <= low <= high <= 1:
            raise ValueError(f"gate thresholds must satisfy 0 <= low <= high <= 1, got low={low}, high={high}")
        aps = [ap_of_ranked(hits[p >= low], n_gt=n_gt) for n_gt, hits, p in self.classes]
        if self.nf_gt:
            below = self.p_values < high
            p = self.p_values[below]
            score = np.where(p < low, 1.0, 1.0 - p)
            order = ranked_order(score, self.nf_rank[below])
            aps.append(ap_of_ranked(self.nf_hit[below][order], n_gt=self.nf_gt))
        return float(np.mean(aps)) if aps else None


def vinbigdata_submission(pred: pd.DataFrame, items: pd.DataFrame, *, no_finding_class: int) -> pd.DataFrame:
    """VinBigData rows: image_id, PredictionString "class score x_min y_min x_max y_max ..." in
    original pixels; "No finding" as "<id> score 0 0 1 1" as the competition defined it, with the
    dataset's own "No finding" id (``no_finding_class``: the number of box classes; 14 for
    VinBigData's); an image without any prediction gets "<id> 1 0 0 1 1"."""
    sizes = items.set_index("image_id")[["width", "height"]]
    by_image = dict(tuple(pred.sort_values("score", ascending=False, kind="stable").groupby("image_id", sort=False)))
    nf = int(no_finding_class)
    rows = []
    for image_id in items["image_id"]:
        p = by_image.get(image_id, pred.iloc[:0])
        w, h = sizes.loc[image_id]
        parts = []
        for r, px in zip(p.itertuples(), to_pixels(p[BOX_COLUMNS].to_numpy(), w, h)):
            if r.class_id == nf:
                parts.append(f"{nf} {r.score:.4f} 0 0 1 1")
            else:
                parts.append(f"{int(r.class_id)} {r.score:.4f} " + " ".join(str(int(round(v))) for v in px))
        rows.append({"image_id": image_id, "PredictionString": " ".join(parts) or f"{nf} 1 0 0 1 1"})
    return pd.DataFrame(rows)


def siim_submission(pred: pd.DataFrame, probs: pd.DataFrame, items: pd.DataFrame, *, study_classes,
                    normal_class: str, no_finding_class: int) -> pd.DataFrame:
    """Kaggle SIIM-COVID19 rows (``id, PredictionString``), studies first.

    "<study>_study": "negative p 0 0 1 1 typical p 0 0 1 1 indeterminate p 0 0 1 1 atypical p 0 0 1 1"
    (the first word of each study class, lower-cased), p the mean of the classifier's probabilities
    over the study's images. "<image>_image": the detector's opacity boxes "opacity score x_min
    y_min x_max y_max" in original pixels, then "none p 0 0 1 1" with p the classifier's
    P(normal class) of that image -- the winners' rule: the study classifier says "no opacity" far
    better than an empty detector output does, so the gate's own "No finding" rows are not used.

    Raises:
        DataError: the items have no ``study_id`` (the SIIM adapter writes one for every image) or an
            image has no class probabilities.
    """
    if "study_id" not in items.columns or items["study_id"].isna().any():
        raise DataError("SIIM submission: the item table has no study_id for every image (the SIIM adapter writes "
                        "one for labeled and unlabeled images alike): rerun the data stage")
    col = f"p:{normal_class}"
    by_id = probs.drop_duplicates("image_id").set_index("image_id")
    missing = sorted(set(items["image_id"]) - set(by_id.index))
    if missing or col not in by_id.columns:
        raise DataError(f"SIIM submission: no class probabilities ({col}) for {len(missing)} images, e.g. "
                        f"{missing[:1]}")
    names = [c.split()[0].lower() for c in study_classes]
    per_study = by_id.loc[items["image_id"], [f"p:{c}" for c in study_classes]].groupby(
        items["study_id"].to_numpy(), sort=False).mean()
    rows = [{"id": f"{study}_study", "PredictionString": " ".join(f"{n} {v:.4f} 0 0 1 1" for n, v in zip(names, p))}
            for study, p in per_study.iterrows()]
    sizes = items.set_index("image_id")[["width", "height"]]
    boxes = pred[pred["class_id"] != no_finding_class].sort_values("score", ascending=False, kind="stable")
    by_image = dict(tuple(boxes.groupby("image_id", sort=False)))
    for image_id in items["image_id"]:
        p = by_image.get(image_id, boxes.iloc[:0])
        w, h = sizes.loc[image_id]
        parts = [f"opacity {r.score:.4f} " + " ".join(f"{v:.1f}" for v in px)
                 for r, px in zip(p.itertuples(), to_pixels(p[BOX_COLUMNS].to_numpy(), w, h))]
        parts.append(f"none {by_id.at[image_id, col]:.4f} 0 0 1 1")
        rows.append({"id": f"{image_id}_image", "PredictionString": " ".join(parts)})
    return pd.DataFrame(rows)


def p_abnormal_series(probs: pd.DataFrame, normal_class: str) -> pd.Series:
    """P(abnormal) = 1 - P(normal class), indexed by image_id."""
    col = f"p:{normal_class}"
    if col not in probs:
        raise ValueError(f"probability table has no column {col!r}: is data.normal_class right?")
    return pd.Series(1.0 - probs[col].to_numpy(np.float64), index=probs["image_id"].to_numpy())
