"""Ordinal-grade maths as pure functions: cumulative targets, expected grades, thresholds, margins.

Why cumulative targets: a grade g of K is encoded as K - 1 binary steps "grade >= k" (k = 1..K-1),
``3 of 0..4 -> [1, 1, 1, 0]``, one sigmoid per step trained with BCE. A model then pays more for a
prediction two grades off than one grade off (two steps wrong instead of one), which is what the
quadratic weighted kappa scores, and no grade is an unordered class of its own. The expected grade
is the sum of the step probabilities; the predicted grade is that score cut by K - 1 thresholds
chosen on out-of-fold predictions for the best QWK (never the fixed k - 0.5 of plain rounding).

Like :mod:`.pseudo`, these functions decide what a student learns, so they take arrays and keyword
arguments, return arrays or named tables, and are tested against hand-computed values. The
selection table they build has the columns :mod:`.pseudo`'s balancing and fallback functions read
(``label``, ``class_index``, ``confidence``, ``threshold``, ``kept``), so grades are balanced and
rescued exactly as classes are.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from ..loops.metrics import apply_ordinal_thresholds, optimize_ordinal_thresholds, quadratic_weighted_kappa
from .pseudo import precision_threshold

SamplingRule = Literal["uniform", "inverse_frequency", "weights"]


def grade_label(grade: int) -> str:
    """How a grade is named in selection tables and reports."""
    return f"grade {int(grade)}"


def rounding_thresholds(num_grades: int) -> np.ndarray:
    """k - 0.5 for k = 1..K-1: plain rounding of the expected grade (what validation uses)."""
    return np.arange(1, num_grades, dtype=np.float64) - 0.5


def cumulative_targets(grades, *, num_grades: int) -> np.ndarray:
    """(N, K-1) float32 targets ``[grade >= 1, ..., grade >= K-1]``: 3 of 5 grades -> [1, 1, 1, 0]."""
    g = np.asarray(grades)
    if g.ndim != 1:
        raise ValueError(f"grades must be 1-D, got shape {g.shape}")
    if num_grades < 2:
        raise ValueError(f"num_grades must be >= 2, got {num_grades}")
    if len(g) and (np.isnan(g.astype(np.float64)).any() or g.min() < 0 or g.max() > num_grades - 1
                   or not np.all(np.mod(g, 1) == 0)):
        raise ValueError(f"grades must be integers in 0..{num_grades - 1}")
    return (g.astype(np.int64)[:, None] >= np.arange(1, num_grades)[None, :]).astype(np.float32)


def expected_grade(cumulative: np.ndarray) -> np.ndarray:
    """(N,) sum of the step probabilities P(grade >= k): the expected grade when they are monotone,
    and in any case the expected number of steps passed (independent sigmoids need not be
    monotone; summing them needs no repair)."""
    c = np.asarray(cumulative, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cumulative probabilities must be (N, K-1), got shape {c.shape}")
    return c.sum(axis=1)


def threshold_grades(scores, *, thresholds) -> np.ndarray:
    """Grade = how many thresholds the expected grade reaches."""
    return apply_ordinal_thresholds(scores, thresholds)


def fit_thresholds(grades, scores, *, num_grades: int) -> np.ndarray:
    """Thresholds for the best QWK of ``scores`` against ``grades`` (loops.metrics's coordinate
    search: starts at rounding, moves one threshold at a time between its neighbours, so the result
    is sorted). Read on out-of-fold predictions only."""
    return optimize_ordinal_thresholds(np.asarray(grades, int), np.asarray(scores, np.float64), num_grades=num_grades)


def threshold_margin(scores, *, thresholds) -> np.ndarray:
    """(N,) distance of each expected grade from the nearest threshold: how far a score is from
    flipping to a neighbouring grade (the confidence of a graded pseudo label)."""
    s, t = np.asarray(scores, np.float64), np.asarray(thresholds, np.float64)
    if t.size == 0:
        return np.full(s.shape, np.inf)
    return np.abs(s[:, None] - t[None, :]).min(axis=1)


def margin_thresholds(scores, grades, *, thresholds, num_grades: int, target_accuracy: float) -> np.ndarray:
    """Per predicted grade, the lowest margin from which OOF predictions of that grade are right at
    least ``target_accuracy`` of the time (+inf when never: that grade keeps nothing)."""
    s = np.asarray(scores, np.float64)
    predicted = threshold_grades(s, thresholds=thresholds)
    margins = threshold_margin(s, thresholds=thresholds)
    correct = predicted == np.asarray(grades, int)
    out = np.full(num_grades, np.inf)
    for g in range(num_grades):
        mine = predicted == g
        if mine.any():
            out[g] = precision_threshold(margins[mine], correct[mine], target_precision=target_accuracy)
    return out


def select_grades(image_ids: Sequence[str], cumulative: np.ndarray, *, thresholds, min_margin) -> pd.DataFrame:
    """One row per pool image: image_id, label ("grade g"), class_index (g), expected (grade),
    confidence (margin), threshold (the margin its grade needs) and kept.

    Args:
        thresholds: the K-1 grade thresholds (from OOF).
        min_margin: one margin for every grade, or K margins (one per predicted grade).
    """
    scores = expected_grade(cumulative)
    if len(image_ids) != len(scores):
        raise ValueError(f"{len(image_ids)} image ids for {len(scores)} rows")
    grade = threshold_grades(scores, thresholds=thresholds)
    margin = threshold_margin(scores, thresholds=thresholds)
    need = np.broadcast_to(np.asarray(min_margin, np.float64), (len(thresholds) + 1,))[grade] if len(grade) else \
        np.zeros(0)
    return pd.DataFrame({"image_id": list(image_ids), "label": [grade_label(g) for g in grade], "class_index": grade,
                         "expected": scores, "confidence": margin, "threshold": need, "kept": margin >= need})


def agreement(model_grades: np.ndarray, ensemble_grades) -> np.ndarray:
    """(N,) share of the models (rows of ``model_grades``, (M, N)) giving the ensemble's grade."""
    m = np.asarray(model_grades)
    return (m == np.asarray(ensemble_grades)[None, :]).mean(axis=0) if m.size else np.zeros(0)


def sampling_weights(grades, *, num_grades: int, rule: SamplingRule, given: Sequence[float] = ()) -> np.ndarray | None:
    """Per-sample draw weights for a WeightedRandomSampler, or None for uniform shuffling.

    inverse_frequency: 1 / (samples of the same grade), so every grade present is drawn equally
    often; weights: ``given[g]`` per grade (K values).
    """
    g = np.asarray(grades, int)
    if rule == "uniform":
        return None
    if rule == "inverse_frequency":
        counts = np.bincount(g, minlength=num_grades).astype(np.float64)
        return 1.0 / counts[g]
    if rule == "weights":
        if len(given) != num_grades or min(given) < 0 or sum(given) <= 0:
            raise ValueError(f"grade weights must be {num_grades} non-negative values (not all 0), got {list(given)}")
        return np.asarray(given, np.float64)[g]
    raise ValueError(f"sampling rule must be uniform, inverse_frequency or weights, got {rule!r}")


def ordinal_metrics(grades, scores, *, predicted, num_grades: int) -> dict:
    """QWK of the predicted (thresholded) grades and of plain rounding of the expected grade, for
    comparison; exact and within-one accuracy; mean absolute error of the expected grade; the
    confusion matrix (rows: true grade, columns: predicted) and the true grades' counts.

    Args:
        grades: (N,) true grades.
        scores: (N,) expected grades.
        predicted: (N,) thresholded grades (OOF rows may be cut by different thresholds per fold).
    """
    y, s, pred = np.asarray(grades, int), np.asarray(scores, np.float64), np.asarray(predicted, int)
    if len(y) == 0 or not (len(y) == len(s) == len(pred)):
        raise ValueError(f"grades ({len(y)}), scores ({len(s)}) and predictions ({len(pred)}): equal, non-zero lengths")
    rounded = threshold_grades(s, thresholds=rounding_thresholds(num_grades))

    def kappa(p: np.ndarray) -> float | None:
        value = quadratic_weighted_kappa(y, p)
        return None if np.isnan(value) else value

    return {"n": int(len(y)), "qwk": kappa(pred), "qwk_rounded": kappa(rounded),
            "accuracy": float((pred == y).mean()), "within_one": float((np.abs(pred - y) <= 1).mean()),
            "mae": float(np.abs(s - y).mean()),
            "confusion": confusion_matrix(y, pred, labels=list(range(num_grades))).tolist(),
            "per_grade": np.bincount(y, minlength=num_grades).tolist()}
