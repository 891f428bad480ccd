"""Per-cycle pseudo-label quality report: one self-contained HTML page and the same numbers as JSON.

Why a report per cycle: a pseudo label is a guess by the teacher, and a student trained on wrong
guesses learns them confidently. Whether a class's pseudo labels can be trusted is answered by the
out-of-fold (OOF) predictions, where the truth is known: precision at the threshold that was used,
calibration, how much the fold models agree, and how labels drift from one teacher to the next. The
page puts a per-class verdict at the top (see :func:`verdict`) and the evidence below it.

Why self-contained: a report is mailed, archived and opened on machines without network (hospital
workstations). Figures are matplotlib PNGs embedded as base64 ``data:`` URIs, the CSS is inline,
and there is no script at all. Only image ids are shown, never a patient id or a DICOM tag.

Layout read (written by :mod:`loops.cycle`): cycle ``c``'s pseudo labels are in
``cycle<c>/pseudo/`` and were made by generation ``c - 1`` (``gen<c-1>/classifier|detector/
predictions``). Written: ``cycle<c>/report.html`` and ``cycle<c>/report.json`` (atomically), and
``index.html`` at the run root by :func:`write_index`.

Measured (``CXR_REPORT_BENCH=1 pytest tests/test_report.py -k realistic``, 2 shared CPU cores): a
run with 600 labeled / 1500 unlabeled / 200 test images, 4 study classes, 14 box classes, 5 folds,
3 cycles gives a 2.8 MB report built in 10-11 s. The bytes are mostly the 246 thumbnails (2.5 MB,
32-colour PNGs, 112 px); the time is mostly matplotlib layout and rendering (about 4 s) and the
thumbnails (about 2 s).
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd

from ..datasets.boxes import BOX_COLUMNS
from ..datasets.table import ItemTable, load_table
from ..datasets.errors import DataError
from ..loops.det_metrics import true_positive_mask
from ..datasets.atomic import atomic_path, read_json, read_table, write_json
from .config import EngineConfig, load_config
from ..datasets.errors import ConfigError
from .pseudo import precision_curve, sharpen

LabelMode = Literal["multiclass", "multilabel"]
Loader = Callable[[str], np.ndarray]

PROB_PREFIX = "p:"  # the probability column prefix of teacher_student.classification (not imported: it pulls torch)

DEFAULT_TARGET_PRECISION = 0.8
"""Class verdicts are read against pseudo.target_precision, or this when the run used a plain confidence."""
TRUST_MAX_ECE = 0.10
"""With soft pseudo labels, a class is trusted only if its teacher is calibrated within this ECE."""
TRUST_LOWER_SLACK = 0.10
"""... and if the 95% lower bound of its OOF precision is at most this far below the target."""
ECE_BINS = 10
THUMB_PX = 112
GRID_N = 6
BOX_GRID_N = 4
LABEL_ISSUES_SHOWN = 12
CURVE_GRID = np.round(np.linspace(0.0, 1.0, 51), 4)
HIST_BINS = np.linspace(0.0, 1.0, 21)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
          "#7f7f7f"]

VERDICT_RULES = [
    ("none kept", "no unlabeled image passed the threshold: this class gives the student nothing."),
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


# ============================================================================ pure maths


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
            slack: float = TRUST_LOWER_SLACK) -> tuple[str, str]:
    """Plain-words verdict on one class's pseudo labels and the rule that made it (see VERDICT_RULES).

    Args:
        precision, low, high: OOF precision at the threshold used and its 95% interval.
        n_oof: OOF predictions at or above the threshold (the evidence behind ``precision``).
        ece: expected calibration error of the teacher on this class (OOF).
        kept: pseudo labels of this class kept on the unlabeled pool.
        max_ece: calibration a trusted class needs; None when the probabilities are not learned
            as such (hard labels, boxes), so calibration does not decide.
    """
    if kept == 0:
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
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
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


def prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"{PROB_PREFIX}{c}" for c in class_names]


# ============================================================================ reading a run


def load_run_config(run_dir: Path) -> tuple[EngineConfig, str | None]:
    """The run's resolved config, or the defaults with a note saying why it could not be read."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return EngineConfig(), f"{path} is missing: config defaults assumed"
    try:
        return load_config(path), None
    except (ConfigError, OSError, ValueError) as err:
        return EngineConfig(), f"{path}: {err}; config defaults assumed"


def _optional(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.exists() else None


_BOX_NUMBERS = ("class_id", *BOX_COLUMNS, "score", "n_models", "fold")
_SELECTION_NUMBERS = ("class_index", "confidence", "threshold", "copies", "cycle")


def _numeric_table(path: Path, numbers: Sequence[str]) -> pd.DataFrame | None:
    """A table with numeric columns also when it has no rows: read_csv types the columns of a
    header-only file as object, on which ``nlargest`` fails (a cycle that kept no pseudo box, a
    dataset with no unlabeled pool for the classifier)."""
    df = _optional(path)
    if df is None:
        return None
    df = df.astype({c: "float64" for c in numbers if c in df.columns and df[c].dtype == object})
    return df.astype({"kept": bool}) if "kept" in df.columns and df.empty else df


def _box_table(path: Path) -> pd.DataFrame | None:
    return _numeric_table(path, _BOX_NUMBERS)


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def cycles_run(run_dir: Path) -> list[int]:
    """Cycles whose pseudo labels exist, in order."""
    found = [int(m.group(1)) for p in Path(run_dir).glob("cycle*/pseudo/class_selection.csv")
             if (m := re.fullmatch(r"cycle(\d+)", p.parent.parent.name))]
    return sorted(found)


def check_cycle(run_dir: Path, cycle: int) -> Path:
    """The cycle's pseudo directory, or a one-line DataError saying what is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / "data" / "table.json").exists():
        raise DataError(f"{run_dir}: not a run directory (no data/table.json); give the --out of a run")
    pseudo_dir = run_dir / f"cycle{cycle}" / "pseudo"
    if not (pseudo_dir / "class_selection.csv").exists():
        done = cycles_run(run_dir)
        raise DataError(f"{pseudo_dir}: cycle {cycle} has not made pseudo labels yet "
                        f"(cycles run: {', '.join(map(str, done)) or 'none'})")
    return pseudo_dir


@dataclass
class CycleData:
    """Everything one cycle's report reads, loaded once."""

    run_dir: Path
    cycle: int
    cfg: EngineConfig
    notes: list[str]
    table: ItemTable
    truth: ItemTable | None
    folds: pd.Series
    oof: pd.DataFrame
    pool: pd.DataFrame | None
    pool_folds: pd.DataFrame | None
    selection: pd.DataFrame
    class_pseudo: pd.DataFrame
    class_info: dict
    matched: pd.DataFrame | None = None
    box_pseudo: pd.DataFrame | None = None
    box_images: pd.DataFrame | None = None
    box_info: dict | None = None
    fused: pd.DataFrame | None = None
    summary: dict | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.table.study_classes)

    @property
    def mode(self) -> LabelMode:
        return self.table.label_mode

    @property
    def has_boxes(self) -> bool:
        return self.matched is not None and self.box_pseudo is not None and bool(self.table.box_classes)

    @property
    def unlabeled_ids(self) -> list[str]:
        return self.table.with_role("unlabeled")["image_id"].tolist()

    def gen_dir(self, gen: int, task: str) -> Path:
        return self.run_dir / f"gen{gen}" / task / "predictions"


def read_cycle(run_dir: str | Path, cycle: int) -> CycleData:
    """Load one cycle's pseudo labels, its teacher's predictions and the run's data."""
    run_dir = Path(run_dir)
    pseudo_dir = check_cycle(run_dir, cycle)
    cfg, note = load_run_config(run_dir)
    teacher = run_dir / f"gen{cycle - 1}" / "classifier" / "predictions"
    if not (teacher / "oof.csv").exists():
        raise DataError(f"{teacher / 'oof.csv'}: the teacher of cycle {cycle} has no OOF predictions")
    truth_dir = run_dir / "data" / "truth"
    d = CycleData(
        run_dir=run_dir, cycle=cycle, cfg=cfg, notes=[note] if note else [], table=load_table(run_dir / "data"),
        truth=load_table(truth_dir) if (truth_dir / "table.json").exists() else None,
        folds=read_table(run_dir / "data" / "folds.csv").set_index("image_id")["fold"],
        oof=read_table(teacher / "oof.csv"), pool=_optional(teacher / "pool.csv"),
        pool_folds=_optional(teacher / "pool_folds.csv"), selection=_numeric_table(pseudo_dir / "class_selection.csv", _SELECTION_NUMBERS),
        class_pseudo=read_table(pseudo_dir / "class_pseudo.csv"),
        class_info=_optional_json(pseudo_dir / "class_pseudo.json") or {},
        summary=_optional_json(run_dir / "summary.json"))
    if (pseudo_dir / "box_pseudo.csv").exists():
        d.matched = _box_table(pseudo_dir / "box_oof_matched.csv")
        d.box_pseudo = _box_table(pseudo_dir / "box_pseudo.csv")
        d.box_images = _optional(pseudo_dir / "box_images.csv")
        d.box_info = _optional_json(pseudo_dir / "box_pseudo.json") or {}
        d.fused = _box_table(run_dir / f"gen{cycle - 1}" / "detector" / "predictions" / "pool_fused.csv")
    return d


def default_loader(run_dir: Path, cfg: EngineConfig) -> Loader:
    """The run's preprocessing cache (``run.cache_dir`` or ``<run>/cache``) as an image loader."""
    from ..datasets.cache import ImageCache

    root = Path(cfg.run.cache_dir) if cfg.run.cache_dir else Path(run_dir) / "cache"
    return ImageCache(root, cfg.preprocess).load


# ============================================================================ per-class statistics


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


def _members(labels: pd.Series, name: str, mode: LabelMode) -> pd.Series:
    if mode == "multiclass":
        return labels == name
    return labels.astype(str).str.split("|").map(lambda parts: name in parts)


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
        kept = int(_members(kept_sel["label"], name, d.mode).sum())
        balanced = d.class_pseudo[_members(d.class_pseudo["label"], name, d.mode)] if len(d.class_pseudo) else d.class_pseudo
        word, why = verdict(precision=at["precision"], low=low, high=high, n_oof=at["kept"], ece=ece, kept=kept,
                            target_precision=target, max_ece=max_ece)
        rows.append({"kind": "class", "name": name, "threshold": float(thresholds[c]), "oof_n": at["kept"],
                     "oof_precision": at["precision"], "ci_low": low, "ci_high": high, "oof_recall": at["recall"],
                     "ece": ece, "kept": kept, "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
                     "truth_precision": truth.get(name), "verdict": word, "rule": why})
    return rows


def box_gt(d: CycleData) -> pd.DataFrame:
    """Ground-truth boxes of the labeled, box-annotated images (the ones OOF boxes are scored on)."""
    from ..datasets.adapters import training_boxes

    boxed = set(d.table.items.loc[d.table.items["box_labeled"], "image_id"]) & set(d.folds.index)
    gt = training_boxes(d.table)
    return gt[gt["image_id"].isin(boxed)]


def box_thresholds_used(d: CycleData) -> np.ndarray:
    given = (d.box_info or {}).get("thresholds") or {}
    return np.array([float("inf") if given.get(n) is None else float(given[n]) for n in d.table.box_classes])


def box_truth_precision(d: CycleData) -> dict[str, float]:
    """Per box class, the share of kept pseudo boxes (on images with hidden truth) matching a true box."""
    if d.truth is None or not d.has_boxes:
        return {}
    from ..datasets.adapters import training_boxes

    known = set(d.truth.items.loc[d.truth.items["box_labeled"], "image_id"])
    boxes = d.box_pseudo[d.box_pseudo["image_id"].isin(known)]
    if boxes.empty:
        return {}
    hits = true_positive_mask(boxes, training_boxes(d.truth), iou_thr=d.cfg.detector.metric_iou)
    return {d.table.box_classes[int(k)]: float(hits[(boxes["class_id"] == k).to_numpy()].mean())
            for k in sorted(boxes["class_id"].unique())}


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
                            target_precision=target, max_ece=None)
        rows.append({"kind": "box", "name": name, "threshold": float(thresholds[k]), "oof_n": at["kept"],
                     "oof_precision": at["precision"], "ci_low": low, "ci_high": high, "oof_recall": at["recall"],
                     "ece": ece, "kept": kept, "after_balance": None, "truth_precision": truth.get(name), "verdict": word,
                     "rule": why})
    return rows


def truth_precision_per_class(d: CycleData) -> dict[str, float | None]:
    """Per class, the share of kept pseudo labels that agree with the hidden truth (demo data)."""
    if d.truth is None:
        return {}
    items = d.truth.items.set_index("image_id")
    kept = d.selection[d.selection["kept"].astype(bool)]
    kept = kept[kept["image_id"].map(lambda i: bool(items["has_study_label"].get(i, False)))]
    if kept.empty:
        return {}
    y = d.truth.study_targets(kept["image_id"])
    out = {}
    for c, name in enumerate(d.classes):
        mine = _members(kept["label"], name, d.mode).to_numpy()
        if mine.any():
            right = y[mine].argmax(axis=1) == c if d.mode == "multiclass" else y[mine, c] >= 0.5
            out[name] = float(right.mean())
    return out


# ============================================================================ HTML pieces


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666}nav a{margin-right:12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.s{text-align:left}.note{background:#fff8e1;border-left:4px solid #f0ad4e;padding:6px 10px}
.v-trust{background:#d7f5dd}.v-review{background:#fff3cd}.v-do-not-use{background:#f8d7da}.v-none-kept{background:#eee}
img.fig{max-width:100%;display:block;margin:6px 0}.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:120px;font-size:11px;color:#444}figure img{width:112px;height:112px;image-rendering:auto}
figcaption{word-break:break-all}.row-label{font-weight:600;margin:8px 0 2px}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN/None as a dash, infinity as 'never' (threshold unreachable)."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return "never" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def html_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A small escaped HTML table; a 'verdict' column is coloured by its value."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cls = "s" if isinstance(value, str) else ""
            if c == "verdict":
                cls += " v-" + str(value).replace(" ", "-")
            cells.append(f'<td class="{cls.strip()}">{esc(fmt(value))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(fig, alt: str) -> str:
    """Render a matplotlib Figure to an embedded PNG <img> (the figure is discarded afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)  # constrained layout already fits the labels
    return f'<img class="fig" alt="{esc(alt)}" src="{png_uri(buf.getvalue())}">'


def panels(n: int, *, ncols: int = 4, width: float = 3.2, height: float = 2.4):
    """A Figure with ``n`` axes in a grid (no pyplot: no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(max(n, 1) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def clean_json(value):
    """JSON-safe copy: NaN/inf become None, numpy scalars plain numbers, frames lists of records."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return clean_json(value.to_dict("records"))
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


@dataclass
class Report:
    """The HTML parts and the JSON numbers of a report, built section by section."""

    parts: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def section(self, anchor: str, title: str) -> None:
        self.sections.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{esc(title)}</h2>')

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def para(self, text: str, cls: str = "") -> None:
        self.parts.append(f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>")


# ============================================================================ figures


def histogram(values: np.ndarray) -> list[int]:
    return np.histogram(np.clip(values, 0, 1), bins=HIST_BINS)[0].tolist()


def confidence_section(d: CycleData, r: Report, stats: list[dict]) -> None:
    """Teacher confidence per class on labeled (OOF) vs unlabeled images, kept/filtered, balance."""
    r.section("confidence", "Teacher confidence and selection (classifier)")
    oof, y = labeled_oof(d)
    cols = prob_columns(d.classes)
    pool = d.pool[d.pool["image_id"].isin(set(d.unlabeled_ids))] if d.pool is not None else None
    oof_scores = class_scores(oof[cols].to_numpy(), y, mode=d.mode)
    pool_scores = class_scores(pool[cols].to_numpy(), None, mode=d.mode) if pool is not None else None
    fig, axes = panels(len(d.classes))
    hist = {}
    for c, (ax, name) in enumerate(zip(axes, d.classes)):
        a = oof_scores[c][0]
        b = pool_scores[c][0] if pool_scores else np.zeros(0)
        ax.hist([a, b], bins=HIST_BINS, density=True, label=["labeled (OOF)", "unlabeled"], color=COLORS[:2])
        if np.isfinite(stats[c]["threshold"]):
            ax.axvline(stats[c]["threshold"], color="k", ls="--", lw=1, label="threshold")
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("teacher p(class)", fontsize=8)
        hist[name] = {"oof": histogram(a), "unlabeled": histogram(b)}
    axes[0].legend(fontsize=7)
    r.add("<p>Density of the teacher's probability for the class it predicts (multilabel: every image), "
          "labeled images out-of-fold vs the unlabeled pool. A pool far more confident than OOF is a warning: "
          "the teacher may be over-confident on images unlike its training set.</p>",
          figure_html(fig, "teacher confidence histograms"))
    r.data["confidence_histograms"] = {"bins": HIST_BINS, "per_class": hist}
    selection_counts(d, r, stats)


def selection_counts(d: CycleData, r: Report, stats: list[dict]) -> None:
    sel = d.selection
    rows = []
    for s in stats:
        predicted = int(_members(sel["label"], s["name"], d.mode).sum())
        rows.append({"class": s["name"], "predicted": predicted, "kept": s["kept"], "filtered": predicted - s["kept"],
                     "after_balance": s["after_balance"]})
    fig, (ax,) = panels(1, width=max(4.0, 1.1 * len(rows) + 2), height=2.6)
    x = np.arange(len(rows))
    for i, key in enumerate(("kept", "filtered", "after_balance")):
        ax.bar(x + (i - 1) * 0.27, [row[key] for row in rows], width=0.27, label=key.replace("_", " "), color=COLORS[i])
    ax.set_xticks(x, [row["class"] for row in rows], fontsize=8, rotation=20)
    ax.set_ylabel("images", fontsize=8)
    ax.legend(fontsize=7)
    r.add("<h3>Kept and filtered, class balance before and after selection</h3>",
          f"<p>{len(sel)} unlabeled images scored; {int(sel['kept'].astype(bool).sum())} kept. "
          "'after balance' counts the copies the student sees (balancing repeats rare classes and trims common ones).</p>",
          html_table(rows), figure_html(fig, "kept, filtered and balanced counts per class"))
    r.data["selection_counts"] = rows


def pr_section(d: CycleData, r: Report, stats: list[dict], box_rows: list[dict]) -> None:
    """Precision and recall against ground truth on OOF, over the threshold, per class and box class."""
    r.section("precision", "Pseudo-label precision and recall on OOF")
    oof, y = labeled_oof(d)
    scored = class_scores(oof[prob_columns(d.classes)].to_numpy(), y, mode=d.mode)
    series = [(s, pr_table(*scored[c], n_positive=positives(y, c, mode=d.mode))) for c, s in enumerate(stats)]
    r.add("<p>Each curve keeps the OOF predictions scoring at least the threshold on the x axis; precision is "
          "the share of them that is right, recall the share of all true images (boxes: ground-truth boxes) "
          "recovered. The dot marks the threshold this cycle used.</p>",
          curves_figure(series, "teacher p(class)"))
    r.data["precision_curves"] = {"classes": {s["name"]: sampled(curve) for s, curve in series}}
    if d.has_boxes:
        gt = box_gt(d)
        box_series = []
        for k, s in enumerate(box_rows):
            m = d.matched[d.matched["class_id"] == k]
            box_series.append((s, pr_table(m["score"].to_numpy(np.float64), m["true_positive"].astype(bool).to_numpy(),
                                           n_positive=int((gt["class_id"] == k).sum()))))
        r.add(f"<h3>Boxes, per class, at IoU {d.cfg.detector.metric_iou:g}</h3>", curves_figure(box_series, "box score"))
        r.data["precision_curves"]["boxes"] = {s["name"]: sampled(curve) for s, curve in box_series}


def sampled(curve: pd.DataFrame) -> dict:
    """A curve read at fixed thresholds (0, 0.02, ..., 1), compact and comparable across cycles."""
    points = [curve_at(curve, t) for t in CURVE_GRID]
    return {"threshold": CURVE_GRID, "precision": [p["precision"] for p in points],
            "recall": [p["recall"] for p in points], "kept": [p["kept"] for p in points]}


def curves_figure(series: list[tuple[dict, pd.DataFrame]], xlabel: str) -> str:
    fig, axes = panels(len(series))
    for ax, (s, curve) in zip(axes, series):
        if len(curve):
            ax.step(curve["threshold"], curve["precision"], where="post", color=COLORS[0], label="precision")
            ax.step(curve["threshold"], curve["recall"], where="post", color=COLORS[2], label="recall")
        if np.isfinite(s["threshold"]) and np.isfinite(s["oof_precision"]):
            ax.plot([s["threshold"]], [s["oof_precision"]], "o", color="k", ms=5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{s['name']} ({s['verdict']})", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    axes[0].legend(fontsize=7)
    return figure_html(fig, f"precision and recall over the threshold ({xlabel})")


def top_label(p: np.ndarray, y: np.ndarray, mode: LabelMode) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) for the overall reliability diagram: the top label (multiclass), or
    every class probability against its own truth (multilabel)."""
    if mode == "multiclass":
        return p.max(axis=1), p.argmax(axis=1) == y.argmax(axis=1)
    return p.ravel(), (y >= 0.5).ravel()


def calibration_section(d: CycleData, r: Report) -> None:
    """Reliability diagram and ECE of the teacher on OOF (overall top-label, and per class)."""
    r.section("calibration", "Calibration of the teacher (OOF)")
    oof, y = labeled_oof(d)
    p = oof[prob_columns(d.classes)].to_numpy(np.float64)
    conf, correct = top_label(p, y, d.mode)
    overall = reliability_table(conf, correct)
    ece = expected_calibration_error(conf, correct)
    per_class = {name: expected_calibration_error(s, c) for name, (s, c) in zip(d.classes, class_scores(p, y, mode=d.mode))}
    fig, (ax1, ax2) = panels(2, ncols=2, width=3.6, height=3.0)
    used = overall[overall["count"] > 0]
    ax1.bar(used["bin_low"], used["accuracy"], width=1 / ECE_BINS, align="edge", color=COLORS[0], alpha=.7,
            edgecolor="k", label="accuracy")
    ax1.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax1.plot(used["mean_confidence"], used["accuracy"], "o-", color=COLORS[1], ms=3)
    ax1.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"reliability (ECE {ece:.3f})")
    ax1.legend(fontsize=7)
    ax2.bar(overall["bin_low"], overall["count"], width=1 / ECE_BINS, align="edge", color=COLORS[2], edgecolor="k")
    ax2.set(xlabel="confidence", ylabel="OOF predictions", title="predictions per bin")
    temperature = d.cfg.pseudo.temperature
    at_t = "" if temperature == 1 else (f" At the run's pseudo.temperature {temperature:g} (what the student learns): "
                                       f"{fmt(expected_calibration_error(*top_label(student_view(d, p), y, d.mode)))}.")
    r.add(f"<p>Expected calibration error of the raw teacher (ECE, {ECE_BINS} equal-width bins): <b>{fmt(ece)}</b>."
          f"{esc(at_t)} Bars below the diagonal mean the teacher is over-confident. Per class (the verdict table's "
          "ECE is at the run's temperature): " + esc(", ".join(f"{k} {fmt(v)}" for k, v in per_class.items())) + ".</p>",
          figure_html(fig, "reliability diagram"))
    r.data["calibration"] = {"ece": ece, "ece_per_class": per_class, "bins": overall,
                             "definition": "multiclass: top-label confidence vs argmax correct; multilabel: every p_c vs y_c"}


def pool_spread(d: CycleData) -> pd.Series:
    """Fold spread (:func:`fold_spread`) of every unlabeled image; empty without pool_folds.csv."""
    if d.pool_folds is None or d.pool_folds.empty:
        return pd.Series(dtype="float64")
    unl = d.pool_folds[d.pool_folds["image_id"].isin(set(d.unlabeled_ids))]
    return fold_spread(unl, columns=prob_columns(d.classes))


def agreement_section(d: CycleData, r: Report, spread: pd.Series) -> None:
    """How much the fold models agree on the pool, and how many models support each fused box."""
    r.section("agreement", "Agreement between fold models")
    if spread.empty:
        r.para("No per-fold pool predictions (pool_folds.csv) for this teacher.", "note")
    kept = set(d.selection.loc[d.selection["kept"].astype(bool), "image_id"])
    n_plots = 1 + int(d.has_boxes and d.fused is not None)
    fig, axes = panels(n_plots, ncols=2, width=3.8, height=2.6)
    is_kept = spread.index.isin(list(kept))
    axes[0].hist([spread[is_kept].to_numpy(), spread[~is_kept].to_numpy()], bins=20, stacked=True,
                 label=["kept", "filtered"], color=COLORS[:2])
    axes[0].set(xlabel="max std of p across folds", ylabel="unlabeled images", title="fold spread")
    axes[0].legend(fontsize=7)
    r.data["agreement"] = {"fold_std": {"mean": float(spread.mean()) if len(spread) else None,
                                        "median": float(spread.median()) if len(spread) else None,
                                        "histogram": np.histogram(spread, bins=10, range=(0, 0.5))[0].tolist(),
                                        "bins": np.linspace(0, 0.5, 11)}}
    if n_plots == 2:
        nm = d.fused["n_models"].astype(int)
        counts = nm.value_counts().sort_index()
        axes[1].bar(counts.index, counts.to_numpy(), color=COLORS[3])
        axes[1].set(xlabel="models supporting the fused box", ylabel="fused pool boxes", title="WBF support")
        r.data["agreement"]["n_models"] = {str(k): int(v) for k, v in counts.items()}
        kept_nm = d.box_pseudo["n_models"].astype(int) if "n_models" in d.box_pseudo else pd.Series(dtype=int)
        r.data["agreement"]["kept_box_mean_n_models"] = float(kept_nm.mean()) if len(kept_nm) else None
    r.add("<p>Left: for each unlabeled image, the largest standard deviation of a class probability across the "
          "fold models (0 = they agree). Pseudo labels the folds disagree on are guesses of one model, not of the "
          "ensemble. Right: how many fold x TTA models contributed to each fused pool box.</p>",
          figure_html(fig, "fold agreement"))


# ============================================================================ drift across cycles


def generation_metrics(d: CycleData) -> list[dict]:
    """Metric per generation 0..cycle: from summary.json when present, else computed from OOF files."""
    gens = [g for g in range(d.cycle + 1) if (d.gen_dir(g, "classifier") / "oof.csv").exists()]
    known = {g.get("generation"): g for g in (d.summary or {}).get("generations", [])}
    out = []
    for g in gens:
        rec = known.get(g)
        if rec is not None:
            out.append({"generation": g, "model": rec.get("model"), "source": "summary.json",
                        "auc_oof": _dig(rec, "classifier", "oof", "auc_macro"),
                        "auc_test": _dig(rec, "classifier", "test", "auc_macro"),
                        "map_oof": _dig(rec, "detector", "oof", "map"), "map_test": _dig(rec, "detector", "test", "map")})
        else:
            out.append({"generation": g, "model": None, "source": "computed", **computed_metrics(d, g)})
    return out


def _dig(d, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def computed_metrics(d: CycleData, gen: int) -> dict:
    from ..loops.metrics import classification_metrics

    oof = read_table(d.gen_dir(gen, "classifier") / "oof.csv")
    known = set(d.table.items.loc[d.table.items["has_study_label"], "image_id"])
    oof = oof[oof["image_id"].isin(known)]
    m = classification_metrics(d.table.study_targets(oof["image_id"]), oof[prob_columns(d.classes)].to_numpy(),
                               d.classes, d.mode)
    out = {"auc_oof": m["auc_macro"], "auc_test": None, "map_oof": None, "map_test": None}
    boxes = d.gen_dir(gen, "detector") / "oof_boxes.csv"
    if d.table.box_classes and boxes.exists():
        from ..loops.det_metrics import mean_average_precision

        gt = box_gt(d)
        ids = sorted(set(d.table.items.loc[d.table.items["box_labeled"], "image_id"]) & set(d.folds.index))
        out["map_oof"] = mean_average_precision(read_table(boxes), gt, num_classes=len(d.table.box_classes),
                                                iou_thr=d.cfg.detector.metric_iou, image_ids=ids)["map"]
    return out


def cycle_drift(d: CycleData) -> tuple[list[dict], list[dict]]:
    """Per cycle 1..c: pool pass rate, kept counts, boxes per image, hidden-truth precision; and the
    share of pool labels that flipped between consecutive generations (0..c, as far as they exist)."""
    rows, labels = [], {}
    for g in range(d.cycle + 1):
        pool = _optional(d.gen_dir(g, "classifier") / "pool.csv")
        if pool is not None:
            pool = pool[pool["image_id"].isin(set(d.unlabeled_ids))]
            labels[g] = hard_label_strings(pool, d.classes, mode=d.mode)
    for k in range(1, d.cycle + 1):
        pdir = d.run_dir / f"cycle{k}" / "pseudo"
        if not (pdir / "class_selection.csv").exists():
            continue
        sel = _numeric_table(pdir / "class_selection.csv", _SELECTION_NUMBERS)
        info = _optional_json(pdir / "class_pseudo.json") or {}
        row = {"cycle": k, "teacher": k - 1, "pool": len(sel), "kept": int(sel["kept"].astype(bool).sum()),
               "pass_rate": float(sel["kept"].astype(bool).mean()) if len(sel) else None,
               "flip_rate": flip_rate(labels[k - 2], labels[k - 1]) if k >= 2 and {k - 2, k - 1} <= labels.keys() else None,
               "truth_precision": info.get("precision")}
        images, boxes = _optional(pdir / "box_images.csv"), _optional(pdir / "box_pseudo.csv")
        if images is not None and boxes is not None and len(images):
            binfo = _optional_json(pdir / "box_pseudo.json") or {}
            row.update(boxes_per_image=len(boxes) / len(images), negative_rate=float((images["status"] == "negative").mean()),
                       box_truth_precision=binfo.get("precision"))
        rows.append(row)
    flips = [{"from": g - 1, "to": g, "flip_rate": flip_rate(labels[g - 1], labels[g])}
             for g in sorted(labels) if g - 1 in labels]
    return rows, flips


def drift_section(d: CycleData, r: Report) -> None:
    r.section("drift", "Drift across cycles")
    rows, flips = cycle_drift(d)
    metrics = generation_metrics(d)
    fig, axes = panels(4, ncols=4, width=2.9, height=2.3)
    cycles = [row["cycle"] for row in rows]
    axes[0].plot([f"{f['from']}→{f['to']}" for f in flips], [f["flip_rate"] for f in flips], "o-", color=COLORS[1])
    axes[0].set(title="pool labels flipped", xlabel="generations", ylim=(0, 1))
    axes[1].plot(cycles, [row["pass_rate"] for row in rows], "o-", color=COLORS[0])
    axes[1].set(title="pool share kept (gate rate)", xlabel="cycle", ylim=(0, 1))
    axes[2].plot(cycles, [row.get("boxes_per_image", np.nan) for row in rows], "o-", color=COLORS[3])
    axes[2].set(title="pseudo boxes per pool image", xlabel="cycle")
    gens = [m["generation"] for m in metrics]
    axes[3].plot(gens, [np.nan if m["auc_oof"] is None else m["auc_oof"] for m in metrics], "o-", label="AUC OOF")
    axes[3].plot(gens, [np.nan if m["map_oof"] is None else m["map_oof"] for m in metrics], "s-", label="mAP OOF")
    axes[3].set(title="metric per generation", xlabel="generation", ylim=(0, 1))
    axes[3].legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.title.set_fontsize(9)
    for ax in axes[1:]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    r.add("<p>A teacher whose labels flip a lot between generations, or a pool share kept that keeps growing "
          "while OOF metrics stall, is confirming its own mistakes rather than learning.</p>",
          figure_html(fig, "drift across cycles"), html_table(rows), html_table(metrics))
    r.data["drift"] = {"cycles": rows, "flips": flips, "generations": metrics}


# ============================================================================ sample grids


class Thumbs:
    """Thumbnails with boxes drawn, as PNG data URIs; failures are counted and reported, not raised."""

    def __init__(self, load: Loader | None, box_classes: Sequence[str], problem: str | None = None):
        self.load, self.box_classes = load, list(box_classes)
        self.failures: list[str] = [problem] if problem else []

    def render(self, image_id: str, boxes: pd.DataFrame | None = None) -> str | None:
        if self.load is None:
            return None
        try:
            array = np.asarray(self.load(image_id))
        except Exception as err:  # noqa: BLE001 -- any loader failure: the report says so instead of dying
            self.failures.append(f"image {image_id}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            return None
        return png_uri(draw_thumbnail(array, boxes, self.box_classes))


def draw_thumbnail(array: np.ndarray, boxes: pd.DataFrame | None, box_classes: Sequence[str], *, size: int = THUMB_PX) -> bytes:
    """A uint8 image as a small RGB PNG with normalized boxes outlined and labelled with their score."""
    from PIL import Image, ImageDraw

    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    image = Image.fromarray(array).convert("RGB").resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    if boxes is not None:
        for row in boxes.itertuples(index=False):
            k = int(row.class_id)
            color = COLORS[k % len(COLORS)] if getattr(row, "kind", "kept") == "kept" else "#ffd400"
            x0, y0, x1, y1 = (float(getattr(row, c)) * size for c in BOX_COLUMNS)
            draw.rectangle([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], outline=color, width=2)
            draw.text((x0 + 2, y0 + 1), f"{float(row.score):.2f}", fill=color)
    buf = io.BytesIO()
    image.quantize(colors=32).save(buf, format="PNG", optimize=True)  # 32 colours: 40% smaller, no visible loss
    return buf.getvalue()


def tile(uri: str | None, caption: str) -> str:
    img = f'<img alt="thumbnail" src="{uri}">' if uri else '<div style="width:112px;height:112px;background:#eee"></div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def class_grid_rows(d: CycleData, name: str, spread: pd.Series) -> dict[str, pd.DataFrame]:
    """Unlabeled images predicted ``name``: most confident kept, nearest the threshold, folds disagreeing most."""
    sel = d.selection[_members(d.selection["label"], name, d.mode)].copy()
    sel["fold_std"] = sel["image_id"].map(spread).astype(float)
    sel["margin"] = (sel["confidence"] - sel["threshold"].astype(float)).abs()
    return {"confident": sel[sel["kept"].astype(bool)].nlargest(GRID_N, "confidence"),
            "borderline": sel.nsmallest(GRID_N, "margin"),
            "folds disagree": sel.dropna(subset=["fold_std"]).nlargest(GRID_N, "fold_std")}


def grids_section(d: CycleData, r: Report, thumbs: Thumbs, spread: pd.Series) -> None:
    """Sample grids per study class and per box class, with pseudo boxes drawn and scores."""
    r.section("grids", "Sample grids")
    kept_boxes = d.box_pseudo.assign(kind="kept") if d.has_boxes else None
    shown = {}
    legend = " ".join(f'<span style="color:{COLORS[k % len(COLORS)]}">&#9632; {esc(n)}</span>'
                      for k, n in enumerate(d.table.box_classes))
    r.add("<p>Unlabeled images with this cycle's kept pseudo boxes drawn with their score; colour = box class"
          f"{': ' + legend if legend else ''}; yellow = a candidate box that was not kept. "
          "Captions: image id, teacher probability, kept or filtered, fold spread.</p>")
    for name in d.classes:
        r.add(f"<h3>{esc(name)}</h3>")
        for label, rows in class_grid_rows(d, name, spread).items():
            tiles = [tile(thumbs.render(row.image_id, _boxes_of(kept_boxes, row.image_id)),
                          f"{esc(row.image_id)}<br>p={row.confidence:.2f} {'kept' if row.kept else 'filtered'}"
                          f"<br>fold sd {fmt(row.fold_std, 2)}") for row in rows.itertuples()]
            r.add(f'<div class="row-label">{esc(label)}</div><div class="grid">{"".join(tiles) or "(none)"}</div>')
            shown.setdefault(name, {})[label] = rows["image_id"].tolist()
    if d.has_boxes and d.fused is not None:
        shown.update(box_grids(d, r, thumbs, kept_boxes))
    if thumbs.failures:
        r.para(f"Thumbnails could not be loaded for {len(thumbs.failures)} image(s); first: {thumbs.failures[0]}", "note")
    r.data["grids"] = {"shown": shown, "thumbnail_failures": thumbs.failures[:20]}


def _boxes_of(boxes: pd.DataFrame | None, image_id: str) -> pd.DataFrame | None:
    return None if boxes is None else boxes[boxes["image_id"] == image_id]


def box_grids(d: CycleData, r: Report, thumbs: Thumbs, kept_boxes: pd.DataFrame) -> dict:
    """Per box class: highest-scoring kept boxes, fused boxes nearest the threshold, least supported boxes."""
    thresholds = box_thresholds_used(d)
    fused = d.fused[d.fused["image_id"].isin(set(d.box_images["image_id"]) if d.box_images is not None else set())]
    shown = {}
    for k, name in enumerate(d.table.box_classes):
        f = fused[fused["class_id"] == k].assign(margin=lambda x: (x["score"] - thresholds[k]).abs())
        picks = {"confident": kept_boxes[kept_boxes["class_id"] == k].nlargest(BOX_GRID_N, "score"),
                 "borderline": f.nsmallest(BOX_GRID_N, "margin") if np.isfinite(thresholds[k]) else f.iloc[:0],
                 "folds disagree": f[f["score"] >= 0.5 * min(thresholds[k], 1.0)].sort_values(
                     ["n_models", "score"], ascending=[True, False]).head(BOX_GRID_N)}
        r.add(f"<h3>box class {esc(name)} (threshold {fmt(thresholds[k], 2)})</h3>")
        for label, rows in picks.items():
            tiles = []
            for row in rows.itertuples():
                one = pd.DataFrame([row._asdict()]).assign(kind="kept" if label == "confident" else "candidate")
                tiles.append(tile(thumbs.render(row.image_id, one),
                                  f"{esc(row.image_id)}<br>score {row.score:.2f}<br>{int(getattr(row, 'n_models', 0))} models"))
            r.add(f'<div class="row-label">{esc(label)}</div><div class="grid">{"".join(tiles) or "(none)"}</div>')
            shown.setdefault(f"box:{name}", {})[label] = rows["image_id"].tolist()
    return shown


# ============================================================================ label issues, data quality


def label_issue_section(d: CycleData, r: Report, thumbs: Thumbs) -> None:
    """Labeled images most likely mislabeled (cleanlab on OOF probabilities), for a human to review first."""
    r.section("label-issues", "Labeled images most likely mislabeled")
    oof, y = labeled_oof(d)
    p = oof[prob_columns(d.classes)].to_numpy(np.float64)
    try:
        order = label_issues(p, y, mode=d.mode)
    except (ValueError, IndexError, ZeroDivisionError) as err:
        r.para(f"cleanlab could not rank label issues: {str(err).splitlines()[0]}", "note")
        r.data["label_issues"] = {"error": str(err).splitlines()[0], "issues": []}
        return
    rows = []
    for rank, i in enumerate(order[:LABEL_ISSUES_SHOWN], start=1):
        given = label_strings(y[i], d.classes, mode=d.mode)[0]
        predicted = label_strings(p[i], d.classes, mode=d.mode)[0]
        p_given = float(p[i, int(y[i].argmax())]) if d.mode == "multiclass" else float(
            np.where(y[i] >= 0.5, p[i], 1 - p[i]).min())
        rows.append({"rank": rank, "image_id": str(oof["image_id"].iloc[i]), "given": given,
                     "oof_predicted": predicted, "p_given": p_given, "fold": int(oof["fold"].iloc[i])})
    tiles = [tile(thumbs.render(row["image_id"]), f"#{row['rank']} {esc(row['image_id'])}<br>given {esc(row['given'])}"
                  f"<br>OOF says {esc(row['oof_predicted'])} (p given {row['p_given']:.2f})") for row in rows]
    r.add(f"<p>cleanlab's confident learning flags {len(order)} of {len(oof)} labeled images whose label disagrees "
          "with out-of-fold probabilities; the most severe first (lowest probability of the given label).</p>",
          html_table(rows), f'<div class="grid">{"".join(tiles)}</div>')
    r.data["label_issues"] = {"flagged": int(len(order)), "labeled": int(len(oof)), "issues": rows}


def quality_section(d: CycleData, r: Report, box_truth: dict[str, float]) -> None:
    """Quarantined inputs (file name only, never a patient id) and hidden-truth precision when known."""
    r.section("data", "Data quality and hidden truth")
    q = d.table.quarantine
    rows = [{"file": Path(str(x.file)).name, "row": None if pd.isna(x.row) else int(x.row),
             "image_id": "" if pd.isna(x.image_id) else str(x.image_id),
             "problem": str(x.problem).replace(str(x.file), Path(str(x.file)).name)}  # folders may name patients
            for x in q.itertuples(index=False)]
    r.add(f"<h3>Quarantine: {len(rows)} input(s) set aside</h3>", html_table(rows[:200], ["file", "row", "image_id", "problem"]))
    if len(rows) > 200:
        r.para(f"... and {len(rows) - 200} more (data/quarantine.csv).")
    truth = {"classifier": d.class_info.get("precision"), "per_class": truth_precision_per_class(d),
             "boxes": (d.box_info or {}).get("precision"), "negatives": (d.box_info or {}).get("negative_precision"),
             "per_box_class": box_truth}
    if d.truth is None:
        r.para("No hidden truth for the unlabeled pool (only the demo and oracle runs have it).")
    else:
        r.add("<h3>Precision of kept pseudo labels against the hidden truth</h3>",
              html_table([{"what": k, "precision": v} for k, v in truth.items() if not k.startswith("per_")] +
                         [{"what": f"class {k}", "precision": v} for k, v in truth["per_class"].items()] +
                         [{"what": f"box class {k}", "precision": v} for k, v in truth["per_box_class"].items()]))
    r.data["quarantine"] = rows
    r.data["hidden_truth_precision"] = truth if d.truth is not None else None


# ============================================================================ the report


def verdict_section(d: CycleData, r: Report, class_rows: list[dict], box_rows: list[dict], target: float, box_target: float) -> None:
    r.section("verdict", "Verdict per class")
    cols = ["kind", "name", "verdict", "threshold", "oof_precision", "ci_low", "ci_high", "oof_n", "oof_recall", "ece",
            "kept", "after_balance", "truth_precision", "rule"]
    r.add(f"<p>Targets: class precision {target:.2f}" + (f", box precision {box_target:.2f}" if box_rows else "") +
          ". Precision and recall are read on out-of-fold predictions at the threshold this cycle used ('never': "
          "no score reaches the target precision).</p>", html_table(class_rows + box_rows, cols))
    rules = "".join(f"<li><b>{esc(w)}</b>: {esc(t)}</li>" for w, t in VERDICT_RULES)
    r.add(f"<details><summary>How the verdict is decided (checked in this order)</summary><ol>{rules}</ol></details>")
    r.data["verdicts"] = {"rules": dict(VERDICT_RULES), "target_precision": target, "box_target_precision": box_target,
                          "classes": class_rows, "boxes": box_rows}


def build_report(d: CycleData, load: Loader | None, load_problem: str | None, target_precision: float | None) -> Report:
    target = target_precision or d.cfg.pseudo.target_precision or DEFAULT_TARGET_PRECISION
    box_target = target_precision or d.cfg.detector.target_precision
    r = Report()
    class_rows = class_stats(d, target)
    box_truth = box_truth_precision(d)
    box_rows = box_stats(d, box_target, box_truth) if d.has_boxes else []
    verdict_section(d, r, class_rows, box_rows, target, box_target)
    confidence_section(d, r, class_rows)
    pr_section(d, r, class_rows, box_rows)
    calibration_section(d, r)
    spread = pool_spread(d)
    agreement_section(d, r, spread)
    if d.has_boxes and d.box_images is not None:
        status = d.box_images["status"].value_counts().to_dict()
        r.add("<h3>Pseudo-box images by status</h3>", html_table([{"status": k, "images": int(v)} for k, v in status.items()]))
        r.data["box_images"] = {k: int(v) for k, v in status.items()}
    drift_section(d, r)
    thumbs = Thumbs(load, d.table.box_classes, load_problem)
    grids_section(d, r, thumbs, spread)
    label_issue_section(d, r, thumbs)
    quality_section(d, r, box_truth)
    return r


def page(title: str, header: str, r: Report) -> str:
    nav = " ".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in r.sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{header}<nav>{nav}</nav>{''.join(r.parts)}</body></html>")


def write_cycle_report(run_dir: str | Path, cycle: int, *, load: Loader | None = None,
                       target_precision: float | None = None) -> Path:
    """Write ``<run>/cycle<c>/report.html`` and ``report.json`` for one cycle; return the HTML path.

    Args:
        run_dir: the run directory (``run.out``).
        cycle: the cycle (>= 1) whose pseudo labels to judge.
        load: image id -> uint8 image, for the thumbnails; None: the run's preprocessing cache.
            When images cannot be loaded the grids say so and the rest of the report is unchanged.
        target_precision: the precision a class must reach to be trusted; None: the run's
            ``pseudo.target_precision`` (``detector.target_precision`` for boxes), else 0.8.

    Raises:
        DataError: the run or the cycle's pseudo labels do not exist (one line).
    """
    start = time.perf_counter()
    d = read_cycle(run_dir, cycle)
    problem = None
    if load is None:
        try:
            load = default_loader(d.run_dir, d.cfg)
        except (DataError, OSError, ValueError) as err:
            problem = f"the preprocessing cache cannot be opened ({err})"
    r = build_report(d, load, problem, target_precision)
    teacher = _dig(next((g for g in (d.summary or {}).get("generations", []) if g.get("generation") == cycle - 1), {}), "model")
    seconds = time.perf_counter() - start
    header = (f"<h1>Pseudo-label quality — cycle {cycle}</h1><p class='meta'>run {esc(d.run_dir.name)} · teacher: "
              f"generation {cycle - 1}{' (' + esc(teacher) + ')' if teacher else ''} · labels: {esc(d.mode)} · "
              f"built {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.1f} s</p>" +
              "".join(f"<p class='note'>{esc(n)}</p>" for n in d.notes))
    text = page(f"cycle {cycle} pseudo-label report", header, r)
    out = d.run_dir / f"cycle{cycle}"
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(text, encoding="utf-8")
    r.data.update(cycle=cycle, teacher_generation=cycle - 1, label_mode=d.mode, notes=d.notes,
                  build={"seconds": round(seconds, 3), "html_bytes": len(text.encode("utf-8"))})
    write_json(out / "report.json", clean_json(r.data))
    return out / "report.html"


# ============================================================================ the index


def write_index(run_dir: str | Path) -> Path:
    """Write ``<run>/index.html``: the per-generation summary table and a link to every cycle report."""
    run_dir = Path(run_dir)
    summary = _optional_json(run_dir / "summary.json") or {}
    r = Report()
    r.section("cycles", "Cycle reports")
    rows = []
    for c in cycles_run(run_dir):
        info = _optional_json(run_dir / f"cycle{c}" / "report.json") or {}
        verdicts = [v["verdict"] for v in _dig(info, "verdicts", "classes") or []] + \
                   [v["verdict"] for v in _dig(info, "verdicts", "boxes") or []]
        counts = ", ".join(f"{w} {verdicts.count(w)}" for w, _ in VERDICT_RULES if verdicts.count(w))
        exists = (run_dir / f"cycle{c}" / "report.html").exists()
        link = f'<a href="cycle{c}/report.html">cycle {c} report</a>' if exists else f"cycle {c}: report not built"
        rows.append(f"<tr><td class='s'>{link}</td><td class='s'>{esc(counts or '–')}</td></tr>")
    r.add("<table><tr><th>report</th><th>verdicts</th></tr>" + "".join(rows) + "</table>" if rows else
          "<p>No cycle has made pseudo labels yet.</p>")
    r.section("summary", "Summary per generation")
    r.add(html_table(summary_rows(summary)) if summary else "<p>summary.json is not written yet (the run is not finished).</p>")
    gate = summary.get("gate")
    if gate:
        r.add(f"<p>Gate ({esc(gate.get('mode'))}, low {fmt(gate.get('low'), 2)}, high {fmt(gate.get('high'), 2)}): "
              f"test mAP with 'No finding' {fmt(_dig(gate, 'test', 'ungated'))} → {fmt(_dig(gate, 'test', 'gated'))}</p>")
    header = f"<h1>Run {esc(run_dir.name)}</h1><p class='meta'>wall time {fmt(summary.get('wall_seconds'), 0)} s</p>"
    with atomic_path(run_dir / "index.html") as tmp:
        tmp.write_text(page(f"run {run_dir.name}", header, r), encoding="utf-8")
    return run_dir / "index.html"


def summary_rows(summary: dict) -> list[dict]:
    """One row per generation (and the oracle) from summary.json."""
    pseudo = {c["cycle"]: c.get("pseudo", {}) for c in summary.get("cycles", [])}
    rows = []
    for g in summary.get("generations", []):
        p = pseudo.get(g["generation"], {})
        rows.append({"generation": g["generation"], "classifier": g.get("model"),
                     "AUC oof": _dig(g, "classifier", "oof", "auc_macro"), "AUC test": _dig(g, "classifier", "test", "auc_macro"),
                     "detector": g.get("detector_model"), "mAP oof": _dig(g, "detector", "oof", "map"),
                     "mAP test": _dig(g, "detector", "test", "map"),
                     "pseudo labels": _dig(p, "classifier", "after_balance"), "pseudo precision": _dig(p, "classifier", "precision"),
                     "pseudo boxes": _dig(p, "detector", "boxes"), "box precision": _dig(p, "detector", "precision")})
    oracle = summary.get("oracle")
    if oracle:
        rows.append({"generation": "oracle", "classifier": oracle.get("model"),
                     "AUC test": _dig(oracle, "classifier", "test", "auc_macro"), "mAP test": _dig(oracle, "detector", "test", "map")})
    return rows
