"""Weighted Boxes Fusion of detector predictions across folds x TTA views (ensemble-boxes).

Why WBF: k fold models x {orig, hflip} give 2k overlapping predictions per object; averaging their
coordinates (weighted by score) localises better than keeping the best one (NMS), and the number of
models that agree is itself a confidence signal for pseudo labels.

Score convention (kept on purpose): with ``conf_type="avg"`` ensemble-boxes sets a fused box's score
to ``sum(score_i * w_i) / len(cluster) * min(len(cluster), n_models) / sum(w)`` -- the mean member
score scaled by the share of the ensemble that saw the box. With equal weights and 10 models, a box
seen by one model at 0.9 fuses to 0.09, a box seen by all ten at 0.9 keeps 0.9. That is the point:
agreement across folds and views is what makes a pseudo box trustworthy. The denominator counts all
models of the ensemble, so pass ``models=`` when some model predicted nothing at all. Note that
``len(cluster)`` counts boxes, not models: two boxes of one model in a cluster count twice (rare
after the detector's own NMS); ``n_models`` below counts distinct models.

``n_models`` (how many distinct models support a fused box): ensemble-boxes does not return its
clusters (it overwrites the member model index with -1), so we match each fused box back to the
inputs: a model counts when one of its boxes of the same class, with score >= ``skip_box_thr``, has
IoU > ``iou_thr`` with the fused box (WBF's own strict match test). This can differ from WBF's
cluster membership in rare chains where a member overlapped the running average enough but not the
final one; a fused box always counts at least its best-overlapping model.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from ..datasets.boxes import BOX_COLUMNS, box_problem, iou_matrix
from ..datasets.progress import Progress

ConfType = Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")
INPUT_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "score", "model"]
FUSED_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "score", "n_models", "models"]
MODEL_SEPARATOR = ";"
FUSE_CHUNK = 64
"""Images fused between two progress updates (serial fusion)."""


def fuse_boxes(
    predictions: pd.DataFrame,
    *,
    iou_thr: float,
    skip_box_thr: float,
    conf_type: ConfType = "avg",
    weights: Mapping[str, float] | None = None,
    models: Sequence[str] | None = None,
    workers: int = 0,
    desc: str = "WBF fusion",
) -> pd.DataFrame:
    """Fuse each image's predictions over its model groups with WBF.

    Args:
        predictions: image_id, class_id (0-based), x_min, y_min, x_max, y_max (normalized), score,
            model (e.g. "f0/orig", "f0/hflip": every fold x view is one model of the ensemble).
        iou_thr: Boxes of one class with IoU above this are fused.
        skip_box_thr: Predictions scoring below this are ignored.
        conf_type: ensemble-boxes' score rule (see the module docstring for "avg").
        weights: Per-model weight (default 1 each); must name every model.
        models: Every model of the ensemble, including any that predicted nothing (they lower
            "avg" scores); default: the models present in ``predictions``.
        workers: >1 fuses chunks of images in that many processes (same result as serial).
        desc: names the progress bar (``datasets.progress``: a bar, or a log line every few seconds).

    Returns:
        image_id, class_id, x_min, y_min, x_max, y_max, score, n_models, models (contributing
        model names joined by ";"), images in input order, highest score first within an image.

    Raises:
        ValueError: naming the image and box, for a box outside [0, 1], inverted, empty or NaN;
            or for an unknown conf_type, a score outside [0, 1], or weights that miss a model.
    """
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {CONF_TYPES}, got {conf_type!r}")
    df = validate_predictions(predictions)
    model_names = _model_names(df, models)
    weight_list = _weight_list(model_names, weights)
    if df.empty:
        return empty_fused()
    tasks = _image_tasks(df, model_names)
    params = dict(iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type, weights=weight_list, model_names=model_names)
    rows: list[tuple] = []
    with Progress(len(tasks), desc, "img") as bar:
        if workers > 1 and len(tasks) > 1:
            chunks = np.array_split(np.arange(len(tasks)), min(len(tasks), workers * 4))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_fuse_chunk, [tasks[i] for i in idx], params) for idx in chunks]
                for future, idx in zip(futures, chunks):
                    rows.extend(future.result())
                    bar.update(len(idx))
        else:
            for start in range(0, len(tasks), FUSE_CHUNK):
                rows.extend(_fuse_chunk(tasks[start:start + FUSE_CHUNK], params))
                bar.update(len(tasks[start:start + FUSE_CHUNK]))
    return _fused_frame(rows)


def validate_predictions(predictions: pd.DataFrame) -> pd.DataFrame:
    """Check columns, boxes, scores and classes; raise ValueError naming the first bad row.

    ensemble-boxes only warns and clips (or drops) such boxes, which would hide a conversion bug.
    """
    missing = [c for c in INPUT_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions: missing columns {missing}")
    df = predictions[INPUT_COLUMNS].reset_index(drop=True)
    df = df.assign(image_id=df["image_id"].astype(str), model=df["model"].astype(str))
    coords = df[BOX_COLUMNS].to_numpy(dtype=np.float64)
    scores = df["score"].to_numpy(dtype=np.float64)
    classes = df["class_id"].to_numpy(dtype=np.float64)
    ok = (
        np.isfinite(coords).all(axis=1) & (coords >= 0).all(axis=1) & (coords <= 1).all(axis=1)
        & (coords[:, 2] > coords[:, 0]) & (coords[:, 3] > coords[:, 1])
    )
    ok &= np.isfinite(scores) & (scores >= 0) & (scores <= 1)
    ok &= np.isfinite(classes) & (classes >= 0) & (classes == np.round(classes))
    if not ok.all():
        raise ValueError(_bad_row_message(df, int(np.flatnonzero(~ok)[0])))
    return df.assign(class_id=df["class_id"].astype(np.int64))


def _bad_row_message(df: pd.DataFrame, row: int) -> str:
    r = df.iloc[row]
    problem = box_problem(*(float(r[c]) for c in BOX_COLUMNS), tol=0.0)
    if problem is None:
        problem = f"score {r['score']!r} outside [0, 1] or class_id {r['class_id']!r} not a non-negative integer"
    return f"predictions, row {row} (image {r['image_id']}, model {r['model']}): {problem}"


def _model_names(df: pd.DataFrame, models: Sequence[str] | None) -> list[str]:
    present = sorted(df["model"].unique())
    if models is None:
        return present
    names = [str(m) for m in models]
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise ValueError(f"predictions come from models {unknown} that are not in models={names}")
    return names


def _weight_list(model_names: list[str], weights: Mapping[str, float] | None) -> list[float] | None:
    if weights is None:
        return None
    missing = [m for m in model_names if m not in weights]
    if missing:
        raise ValueError(f"weights name no weight for models {missing}")
    return [float(weights[m]) for m in model_names]


def _image_tasks(df: pd.DataFrame, model_names: list[str]) -> list[tuple]:
    """One picklable (image_id, boxes, scores, labels, model_index) tuple per image, in input order."""
    index = {m: i for i, m in enumerate(model_names)}
    model_idx = df["model"].map(index).to_numpy(dtype=np.int64)
    boxes = df[BOX_COLUMNS].to_numpy(dtype=np.float64)
    scores = df["score"].to_numpy(dtype=np.float64)
    labels = df["class_id"].to_numpy(dtype=np.int64)
    groups = df.groupby("image_id", sort=False).indices
    return [(image_id, boxes[rows], scores[rows], labels[rows], model_idx[rows]) for image_id, rows in groups.items()]


def _fuse_chunk(tasks: list[tuple], params: dict) -> list[tuple]:
    """Fuse a list of images; a top-level function so worker processes can run it."""
    rows = []
    for image_id, boxes, scores, labels, model_idx in tasks:
        rows.extend(_fuse_image(image_id, boxes, scores, labels, model_idx, **params))
    return rows


def _fuse_image(image_id, boxes, scores, labels, model_idx, *, iou_thr, skip_box_thr, conf_type, weights, model_names):
    n = len(model_names)
    per_model = [model_idx == m for m in range(n)]
    fused, fused_scores, fused_labels = weighted_boxes_fusion(
        [boxes[k] for k in per_model], [scores[k] for k in per_model], [labels[k] for k in per_model],
        weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type,
    )
    support = _supporting_models(fused, fused_labels, boxes, scores, labels, model_idx, iou_thr=iou_thr, skip_box_thr=skip_box_thr)
    return [
        (image_id, int(c), *map(float, b), float(s), len(m), MODEL_SEPARATOR.join(model_names[i] for i in m))
        for b, s, c, m in zip(fused, fused_scores, fused_labels, support)
    ]


def _supporting_models(fused, fused_labels, boxes, scores, labels, model_idx, *, iou_thr, skip_box_thr) -> list[list[int]]:
    """For each fused box, the sorted indices of models with a same-class input box overlapping it."""
    keep = scores >= skip_box_thr
    boxes, labels, model_idx = boxes[keep], labels[keep], model_idx[keep]
    fused_labels = np.asarray(fused_labels, dtype=np.int64)
    support: list[list[int]] = [[] for _ in range(len(fused))]
    for label in np.unique(fused_labels):  # IoU only within a class: smaller matrices
        rows, cols = np.flatnonzero(fused_labels == label), np.flatnonzero(labels == label)
        ious = iou_matrix(fused[rows], boxes[cols])
        for r, iou in zip(rows, ious):
            members = set(model_idx[cols[iou > iou_thr]].tolist()) or {int(model_idx[cols[int(np.argmax(iou))]])}
            support[r] = sorted(members)
    return support


def _fused_frame(rows: list[tuple]) -> pd.DataFrame:
    if not rows:
        return empty_fused()
    df = pd.DataFrame(rows, columns=FUSED_COLUMNS)
    return df.astype({**{c: np.float32 for c in BOX_COLUMNS}, "score": np.float32, "class_id": np.int64, "n_models": np.int64})


def empty_fused() -> pd.DataFrame:
    """The fused table with no rows, with the right columns and dtypes."""
    return pd.DataFrame(
        {
            "image_id": pd.Series(dtype="str"),
            "class_id": pd.Series(dtype="int64"),
            **{c: pd.Series(dtype="float32") for c in BOX_COLUMNS},
            "score": pd.Series(dtype="float32"),
            "n_models": pd.Series(dtype="int64"),
            "models": pd.Series(dtype="str"),
        }
    )[FUSED_COLUMNS]
