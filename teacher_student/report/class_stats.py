"""The verdict table's rows: one per study class and one per box class, read off the OOF predictions.

Why per class: a teacher can be trustworthy on one finding and guessing on another, so each class
is judged at the threshold it was selected at (:func:`class_thresholds_used`), with the statistics
of :mod:`.stats`; where the run has hidden truth (the demo) the kept pseudo labels are also scored
against it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluation import box_truth_precision_per_class, class_members, class_truth_precision_per_class
from ..layout import prob_columns
from ..pseudo import LabelMode, sharpen
from .run_reader import CycleData
from .stats import (TRUST_MAX_ECE, class_scores, curve_at, expected_calibration_error, positives, pr_table, verdict,
                    wilson_interval)


def class_thresholds_used(d: CycleData) -> np.ndarray:
    """The threshold each class was selected at: per-class from OOF, else the global confidence."""
    given = d.class_info.get("thresholds")
    if given:
        return np.array([float("inf") if given.get(c) is None else float(given[c]) for c in d.classes])
    return np.full(len(d.classes), float(d.cfg.pseudo.confidence))


def labeled_oof(d: CycleData) -> tuple[pd.DataFrame, np.ndarray]:
    """OOF rows of images with a study label, and their targets."""
    known = set(d.table.items.loc[d.table.items["has_study_label"], "image_id"])
    oof = d.oof[d.oof["image_id"].isin(known)].reset_index(drop=True)
    return oof, d.table.study_targets(oof["image_id"])


def student_view(d: CycleData, probs: np.ndarray) -> np.ndarray:
    """The probabilities as the student learns them: raw teacher output at ``pseudo.temperature``."""
    return sharpen(probs, temperature=d.cfg.pseudo.temperature, mode=d.mode).astype(np.float64)


def class_stats(d: CycleData, target: float) -> list[dict]:
    """One row per study class: threshold, OOF precision/recall there, ECE (at the run's
    temperature), kept counts, verdict."""
    oof, y = labeled_oof(d)
    raw = oof[prob_columns(d.classes)].to_numpy(np.float64)
    scored = class_scores(raw, y, mode=d.mode)
    calibration = class_scores(student_view(d, raw), y, mode=d.mode)
    max_ece = TRUST_MAX_ECE if d.cfg.pseudo.mode == "soft" else None
    thresholds = class_thresholds_used(d)
    kept_sel = d.selection[d.selection["kept"].astype(bool)]
    truth = truth_precision_per_class(d)
    rows = []
    for c, name in enumerate(d.classes):
        scores, correct = scored[c]
        at = curve_at(pr_table(scores, correct, n_positive=positives(y, c, mode=d.mode)), thresholds[c])
        low, high = wilson_interval(at["true_positives"], at["kept"])
        ece = expected_calibration_error(*calibration[c])
        kept = int(class_members(kept_sel["label"], name, d.mode).sum())
        balanced = d.class_pseudo[class_members(d.class_pseudo["label"], name, d.mode)] if len(d.class_pseudo) else d.class_pseudo
        word, why = verdict(precision=at["precision"], low=low, high=high, n_oof=at["kept"], ece=ece, kept=kept,
                            target_precision=target, max_ece=max_ece, threshold=float(thresholds[c]))
        rows.append({"kind": "class", "name": name, "threshold": float(thresholds[c]), "oof_n": at["kept"],
                     "evidence": evidence((d.class_info.get("support") or {}).get(name),
                                          d.cfg.pseudo.min_oof_support if d.class_info.get("thresholds") else 0),
                     "oof_precision": at["precision"], "ci_low": low, "ci_high": high, "oof_recall": at["recall"],
                     "ece": ece, "kept": kept, "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
                     "truth_precision": truth.get(name), "verdict": word, "rule": why})
    return rows


def box_gt(d: CycleData) -> pd.DataFrame:
    """Ground-truth boxes of the labeled, box-annotated images (the ones OOF boxes are scored on)."""
    from ...datasets.adapters import training_boxes

    boxed = set(d.table.items.loc[d.table.items["box_labeled"], "image_id"]) & set(d.folds.index)
    gt = training_boxes(d.table)
    return gt[gt["image_id"].isin(boxed)]


def evidence(support: int | None, minimum: int) -> str | None:
    """How many OOF predictions the class's threshold was read from, flagged "weak" under the
    run's minimum (``*.min_oof_support``): a precision read off a handful of images means nothing."""
    if support is None:
        return None
    return f"weak: n={int(support)} < {minimum}" if support < minimum else f"n={int(support)}"


def box_thresholds_used(d: CycleData) -> np.ndarray:
    """The score each box class's pseudo boxes passed: the top-k fallback's where it applied."""
    info = d.box_info or {}
    given = info.get("thresholds_used") or info.get("thresholds") or {}
    return np.array([float("inf") if given.get(n) is None else float(given[n]) for n in d.table.box_classes])


def box_truth_precision(d: CycleData) -> dict[str, float]:
    """Per box class, the share of kept pseudo boxes (on images with hidden truth) matching a true box."""
    if d.truth is None or not d.has_boxes:
        return {}
    return box_truth_precision_per_class(d.box_pseudo, d.truth, d.table.box_classes, iou_thr=d.cfg.detector.metric_iou)


def box_stats(d: CycleData, target: float, truth: dict[str, float]) -> list[dict]:
    """One row per box class: score threshold, OOF precision/recall (vs GT boxes) there, ECE, kept
    boxes, and ``truth`` (:func:`box_truth_precision`)."""
    gt = box_gt(d)
    thresholds = box_thresholds_used(d)
    rows = []
    for k, name in enumerate(d.table.box_classes):
        m = d.matched[d.matched["class_id"] == k]
        scores, correct = m["score"].to_numpy(np.float64), m["true_positive"].astype(bool).to_numpy()
        at = curve_at(pr_table(scores, correct, n_positive=int((gt["class_id"] == k).sum())), thresholds[k])
        low, high = wilson_interval(at["true_positives"], at["kept"])
        ece = expected_calibration_error(np.clip(scores, 0, 1), correct)
        kept = int((d.box_pseudo["class_id"] == k).sum())
        word, why = verdict(precision=at["precision"], low=low, high=high, n_oof=at["kept"], ece=ece, kept=kept,
                            target_precision=target, max_ece=None, threshold=float(thresholds[k]))
        rows.append({"kind": "box", "name": name, "threshold": float(thresholds[k]), "oof_n": at["kept"],
                     "evidence": evidence(((d.box_info or {}).get("support") or {}).get(name), d.cfg.detector.min_oof_support),
                     "oof_precision": at["precision"], "ci_low": low, "ci_high": high, "oof_recall": at["recall"],
                     "ece": ece, "kept": kept, "after_balance": None, "truth_precision": truth.get(name), "verdict": word,
                     "rule": why})
    return rows


def truth_precision_per_class(d: CycleData) -> dict[str, float]:
    """Per class, the share of kept pseudo labels that agree with the hidden truth (demo data)."""
    return class_truth_precision_per_class(d.selection, d.truth, d.classes, d.mode)
