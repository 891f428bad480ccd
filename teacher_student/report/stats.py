"""The report's statistics: calibration, precision intervals, verdicts, label issues (pure functions).

Why pure: every number the report shows is one of these applied to tables the run already wrote,
so each can be checked on a hand computation (tests/test_report.py) without building a run.
Scores are measured exactly as :mod:`teacher_student.pseudo` selects pseudo labels, so the report
judges the same predictions the thresholds were chosen on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..layout import prob_columns
from ..pseudo import LabelMode, precision_curve

DEFAULT_TARGET_PRECISION = 0.8
"""Class verdicts are read against pseudo.target_precision, or this when the run used a plain confidence."""
TRUST_MAX_ECE = 0.10
"""With soft pseudo labels, a class is trusted only if its teacher is calibrated within this ECE."""
TRUST_LOWER_SLACK = 0.10
"""... and if the 95% lower bound of its OOF precision is at most this far below the target."""
ECE_BINS = 10

VERDICT_RULES = [
    ("none kept", "no unlabeled image passed the threshold, or the threshold is 'never' (no OOF score reaches the "
                  "target precision): this class gives the student nothing."),
    ("do not use", "even the upper end of the 95% interval of the OOF precision at the threshold used is below "
                   "the target: these pseudo labels are wrong more often than the run asked for."),
    ("trust", "OOF precision at the threshold reaches the target and its 95% lower bound is within "
              f"{TRUST_LOWER_SLACK:.2f} of it. With soft pseudo labels (pseudo.mode soft: the student learns the "
              "teacher's probabilities, after pseudo.temperature) the teacher must also be calibrated, ECE <= "
              f"{TRUST_MAX_ECE:.2f} at that temperature; hard labels and pseudo boxes are used as labels, so their "
              "ECE is shown but not required."),
    ("review", "anything else: too few OOF images above the threshold to tell, a wide interval, or a "
               "miscalibrated teacher. Look at the curves and the sample grids before training on it."),
]


def reliability_table(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Equal-width confidence bins ``(lo, hi]`` (the first also holds 0) with count, mean confidence
    and accuracy: the numbers behind a reliability diagram. Empty bins have NaN means."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"confidence ({conf.size}) and correct ({hit.size}) differ in length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if conf.size and (np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidence must lie in [0, 1] without NaN")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=hit, minlength=n_bins) / count
    return pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:], "count": count,
                         "mean_confidence": mean_conf, "accuracy": accuracy})


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, *, n_bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): sum over bins of (bin share) x |accuracy - mean confidence|.

    0 means "when the teacher says 0.9 it is right 90% of the time"; NaN for no predictions.
    """
    table = reliability_table(confidence, correct, n_bins=n_bins)
    total = table["count"].sum()
    if total == 0:
        return float("nan")
    used = table[table["count"] > 0]
    return float((used["count"] / total * (used["accuracy"] - used["mean_confidence"]).abs()).sum())


def wilson_interval(successes: int, total: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy); (nan, nan) when ``total`` is 0."""
    if total <= 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(total)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def verdict(*, precision: float, low: float, high: float, n_oof: int, ece: float, kept: int,
            target_precision: float, max_ece: float | None = TRUST_MAX_ECE,
            slack: float = TRUST_LOWER_SLACK, threshold: float | None = None) -> tuple[str, str]:
    """Plain-words verdict on one class's pseudo labels and the rule that made it (see VERDICT_RULES).

    Args:
        precision, low, high: OOF precision at the threshold used and its 95% interval.
        n_oof: OOF predictions at or above the threshold (the evidence behind ``precision``).
        ece: expected calibration error of the teacher on this class (OOF).
        kept: pseudo labels of this class kept on the unlabeled pool.
        max_ece: calibration a trusted class needs; None when the probabilities are not learned
            as such (hard labels, boxes), so calibration does not decide.
        threshold: the threshold used; infinite ('never') means no OOF score reached the target,
            which is why nothing was kept -- not that the pool lacked confident images.
    """
    if kept == 0:
        if threshold is not None and np.isinf(threshold):
            return "none kept", (f"threshold 'never': no OOF score reaches the target precision {target_precision:.2f}, "
                                 "so no unlabeled image can pass")
        return "none kept", "no unlabeled image passed the threshold"
    if n_oof == 0 or not np.isfinite(precision):
        return "review", "no OOF prediction reaches the threshold, so its precision is unknown"
    where = f"OOF precision {precision:.2f} (95% CI {low:.2f}-{high:.2f}, n={n_oof})"
    if high < target_precision:
        return "do not use", f"{where}: below the target {target_precision:.2f} even at the upper bound"
    failed = []
    if precision < target_precision:
        failed.append(f"precision below the target {target_precision:.2f}")
    if low < target_precision - slack:
        failed.append(f"lower bound below {target_precision - slack:.2f} (too little evidence)")
    if max_ece is not None and (not np.isfinite(ece) or ece > max_ece):
        failed.append(f"ECE {ece:.3f} above {max_ece:.2f}")
    if failed:
        return "review", f"{where}: " + "; ".join(failed)
    calibrated = f", ECE {ece:.3f} <= {max_ece:.2f}" if max_ece is not None else ""
    return "trust", f"{where} >= target {target_precision:.2f}{calibrated}"


def class_scores(probs: np.ndarray, targets: np.ndarray | None, *, mode: LabelMode) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, the (scores, correct) of the predictions that would become pseudo labels of it.

    The same definition as :func:`teacher_student.pseudo.class_thresholds`, so the report measures
    exactly what the threshold was chosen on. Multiclass: images whose argmax is c, scored by p_c,
    correct when the true argmax is c. Multilabel: every image, scored by p_c, correct when c is
    present. ``targets`` None (the unlabeled pool) gives all-False ``correct``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:  # (N, C) as given: an empty pool is (0, C), which reshape(0, -1) cannot infer
        probs = probs.reshape(len(probs), -1)
    y = None if targets is None else np.asarray(targets, dtype=np.float64)
    out = []
    for c in range(probs.shape[1]):
        if mode == "multiclass":
            mask = probs.argmax(axis=1) == c
            correct = np.zeros(mask.sum(), bool) if y is None else y[mask].argmax(axis=1) == c
            out.append((probs[mask, c], correct))
        else:
            out.append((probs[:, c], np.zeros(len(probs), bool) if y is None else y[:, c] >= 0.5))
    return out


def pr_table(scores: np.ndarray, correct: np.ndarray, *, n_positive: int | None = None) -> pd.DataFrame:
    """:func:`teacher_student.pseudo.precision_curve` with recall over ``n_positive`` true items
    (all images of the class, or all ground-truth boxes) instead of the correct ones among those scored."""
    curve = precision_curve(scores, correct)
    if n_positive is not None:
        curve["recall"] = curve["true_positives"] / max(int(n_positive), 1)
    return curve


def curve_at(curve: pd.DataFrame, threshold: float) -> dict:
    """Kept, true positives, precision and recall of "keep scores >= threshold" read off a curve."""
    above = curve[curve["threshold"] >= threshold - 1e-12] if np.isfinite(threshold) else curve.iloc[:0]
    if above.empty:
        return {"kept": 0, "true_positives": 0, "precision": float("nan"), "recall": 0.0}
    row = above.iloc[-1]
    return {"kept": int(row["kept"]), "true_positives": int(row["true_positives"]),
            "precision": float(row["precision"]), "recall": float(row["recall"])}


def fold_spread(pool_folds: pd.DataFrame, *, columns: Sequence[str]) -> pd.Series:
    """Per image, the largest standard deviation across fold models of any class probability
    (0: the folds agree exactly). Indexed by image_id."""
    if pool_folds.empty:
        return pd.Series(dtype="float64")
    std = pool_folds.groupby("image_id")[list(columns)].std(ddof=0)
    return std.max(axis=1).rename("fold_std")


def label_strings(values: np.ndarray, class_names: Sequence[str], *, mode: LabelMode) -> list[str]:
    """Labels as :func:`teacher_student.pseudo.select_pseudo` writes them: the argmax class name,
    or (multilabel) the '|'-joined classes with p >= 0.5, 'none' when there is none."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(class_names))
    if mode == "multiclass":
        return [class_names[i] for i in values.argmax(axis=1)]
    return ["|".join(c for c, v in zip(class_names, row) if v >= 0.5) or "none" for row in values]


def hard_label_strings(probs: pd.DataFrame, class_names: Sequence[str], *, mode: LabelMode) -> pd.Series:
    """The label a probability table implies per image, indexed by image_id."""
    labels = label_strings(probs[prob_columns(class_names)].to_numpy(), class_names, mode=mode)
    return pd.Series(labels, index=probs["image_id"].to_numpy())


def positives(targets: np.ndarray, c: int, *, mode: LabelMode) -> int:
    """How many images truly belong to class c (the denominator of recall)."""
    y = np.asarray(targets, dtype=np.float64)
    return int((y.argmax(axis=1) == c).sum()) if mode == "multiclass" else int((y[:, c] >= 0.5).sum())


def flip_rate(previous: pd.Series, current: pd.Series) -> float:
    """Share of the images both teachers labeled whose label changed; NaN when they share none."""
    common = previous.index.intersection(current.index)
    if len(common) == 0:
        return float("nan")
    return float((previous.loc[common] != current.loc[common]).mean())


def label_issues(oof_probs: np.ndarray, targets: np.ndarray, *, mode: LabelMode) -> np.ndarray:
    """Indices of labeled images most likely mislabeled, most severe first (cleanlab).

    Confident learning compares each given label with the OOF probabilities of a model that never
    saw the image. Multiclass labels are the argmax of the targets; multilabel uses cleanlab's
    multilabel filter with the present classes as each image's label list.
    """
    probs = np.clip(np.asarray(oof_probs, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(targets, dtype=np.float64)
    if mode == "multiclass":
        from cleanlab.filter import find_label_issues

        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        return np.asarray(find_label_issues(y.argmax(axis=1), probs, return_indices_ranked_by="self_confidence",
                                            n_jobs=1))
    from cleanlab.multilabel_classification.filter import find_label_issues as find_multilabel_issues

    labels = [list(np.flatnonzero(row >= 0.5)) for row in y]
    return np.asarray(find_multilabel_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1))


def top_label(p: np.ndarray, y: np.ndarray, mode: LabelMode) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) for the overall reliability diagram: the top label (multiclass), or
    every class probability against its own truth (multilabel)."""
    if mode == "multiclass":
        return p.max(axis=1), p.argmax(axis=1) == y.argmax(axis=1)
    return p.ravel(), (y >= 0.5).ravel()
