"""Classification metrics (scikit-learn underneath) and ordinal-grade thresholds.

Targets may be soft (blended or pseudo labels): for metrics that need hard labels a multiclass row
counts as its argmax class and a multilabel entry as positive at >= 0.5. A class whose truth has a
single value in the set (all negative, say, in a small validation fold) has no AUC: it is reported
as None rather than crashing the run or silently skewing the macro mean.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

Mode = Literal["multiclass", "multilabel"]


def _check(y_true, probs, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and probs {p.shape} must both be (N, C)")
    if y.shape[1] != len(class_names):
        raise ValueError(f"{y.shape[1]} columns but {len(class_names)} class names")
    if len(y) == 0:
        raise ValueError("no rows to evaluate")
    for name, a in (("y_true", y), ("probs", p)):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name} must hold finite values in [0, 1] (unlabeled rows must be removed first)")
    return y, p


def hard_labels(y: np.ndarray, mode: Mode) -> np.ndarray:
    """(N,) class indices for multiclass, (N, C) 0/1 for multilabel."""
    return y.argmax(axis=1) if mode == "multiclass" else (y >= 0.5).astype(int)


def classification_metrics(y_true, probs, class_names: Sequence[str], mode: Mode) -> dict:
    """AUC (macro and per class), accuracy, macro F1 and log loss.

    Args:
        y_true: (N, C) one-hot / multi-hot or soft targets.
        probs: (N, C) predicted probabilities.
        class_names: names of the C columns, used as keys of ``auc_per_class``.
        mode: "multiclass" (accuracy = argmax matches) or "multilabel" (accuracy = every label
            right at 0.5, scikit-learn's subset accuracy).

    Returns:
        dict with n, auc_macro (None if no class has both values), auc_per_class {name: float|None},
        accuracy, f1_macro, log_loss.
    """
    if mode not in ("multiclass", "multilabel"):
        raise ValueError(f"mode must be 'multiclass' or 'multilabel', got {mode!r}")
    y, p = _check(y_true, probs, class_names)
    truth = hard_labels(y, mode)
    auc = {}
    for c, name in enumerate(class_names):
        positive = truth == c if mode == "multiclass" else truth[:, c] == 1
        auc[name] = float(roc_auc_score(positive, p[:, c])) if 0 < positive.sum() < len(positive) else None
    defined = [v for v in auc.values() if v is not None]
    pred = hard_labels(p, mode)
    if mode == "multiclass":
        f1 = f1_score(truth, pred, average="macro", zero_division=0)
    else:  # labels never present nor predicted are left out of the mean, not counted as 0
        f1 = f1_score(truth, pred, average="macro", zero_division=np.nan)
    return {
        "n": int(len(y)),
        "auc_macro": float(np.mean(defined)) if defined else None,
        "auc_per_class": auc,
        "accuracy": float(accuracy_score(truth, pred)),
        "f1_macro": None if np.isnan(f1) else float(f1),
        "log_loss": soft_log_loss(y, p, mode=mode),
    }


def soft_log_loss(y_true, probs, *, mode: Mode, eps: float = 1e-7) -> float:
    """Cross-entropy against (possibly soft) targets; equals sklearn's log_loss for hard labels.

    multiclass: mean over rows of -sum_c y log p. multilabel: mean binary cross-entropy over all
    entries. Probabilities are clipped to [eps, 1 - eps] so one confident mistake is finite.
    """
    y, p = np.asarray(y_true, np.float64), np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    if mode == "multiclass":
        return float(-(y * np.log(p)).sum(axis=1).mean())
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# ------------------------------------------------------------------------------ ordinal grades


def quadratic_weighted_kappa(y, y_pred) -> float:
    """Cohen's kappa with quadratic weights (grades 0..K-1); NaN when undefined (one grade only)."""
    y, y_pred = np.asarray(y, int), np.asarray(y_pred, int)
    if len(np.union1d(y, y_pred)) < 2:  # kappa is 0/0 here; sklearn would warn and return NaN
        return float("nan")
    return float(cohen_kappa_score(y, y_pred, weights="quadratic"))


qwk = quadratic_weighted_kappa


def apply_ordinal_thresholds(scores, thresholds) -> np.ndarray:
    """Grade = how many thresholds a score reaches (thresholds sorted ascending)."""
    return np.digitize(np.asarray(scores, np.float64), np.sort(np.asarray(thresholds, np.float64)))


def optimize_ordinal_thresholds(
    y_true_grades, expected_grade_scores, *, num_grades: int | None = None, passes: int = 5, grid: int = 100,
) -> np.ndarray:
    """Thresholds on an expected-grade score that maximise QWK against the true grades.

    Coordinate search, starting at 0.5, 1.5, ..., K-1.5 (rounding the expected grade): each pass
    moves one threshold at a time to the best of ``grid`` score quantiles between its neighbours,
    so the thresholds stay sorted; it stops when a pass changes nothing. Ties keep the current
    value, so a start that is already optimal is returned unchanged.

    Args:
        y_true_grades: (N,) int grades 0..K-1.
        expected_grade_scores: (N,) scores, e.g. sum_k k * p_k.
        num_grades: K; default max(y_true_grades) + 1.

    Returns:
        (K-1,) ascending thresholds.
    """
    y = np.asarray(y_true_grades, int)
    s = np.asarray(expected_grade_scores, np.float64)
    if y.shape != s.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError(f"grades {y.shape} and scores {s.shape} must be equal-length 1-D arrays")
    k = int(num_grades or y.max() + 1)
    t = np.arange(k - 1, dtype=np.float64) + 0.5
    if k < 2:
        return t
    best = _kappa_or_minus(y, apply_ordinal_thresholds(s, t))
    for _ in range(passes):
        changed = False
        for i in range(k - 1):
            lo = t[i - 1] if i > 0 else min(s.min(), t[i]) - 1e-6
            hi = t[i + 1] if i < k - 2 else max(s.max(), t[i]) + 1e-6
            inside = s[(s > lo) & (s < hi)]
            candidates = np.unique(np.quantile(inside, np.linspace(0, 1, grid))) if len(inside) else np.array([])
            for c in candidates:
                trial = t.copy()
                trial[i] = c
                value = _kappa_or_minus(y, apply_ordinal_thresholds(s, trial))
                if value > best + 1e-12:
                    best, t, changed = value, trial, True
        if not changed:
            break
    return t


def _kappa_or_minus(y: np.ndarray, pred: np.ndarray) -> float:
    value = quadratic_weighted_kappa(y, pred)
    return -1.0 if np.isnan(value) else value
