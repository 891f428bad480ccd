"""The training-curves section: loss and validation metric per epoch, per fold, of the teacher that
made this cycle's pseudo labels and of the student that trained on them.

Why in the report: whether a fold model learned at all (a flat loss, a metric stuck at chance), or
overfitted (train loss falling while validation loss rises), decides how much its pseudo labels are
worth, and the numbers otherwise sit in one ``history.json`` per fold deep in the run folder.
Curves come from each fold's ``history.json`` (:func:`history_rows`); a generation still
training, or a fold without a history, is said so instead of drawn.
"""
from __future__ import annotations

import numpy as np

from ...datasets.atomic import read_json
from ..layout import CLASSIFIER, DETECTOR, HISTORY
from .figures import COLORS, panels
from .html import Report, esc, figure_html
from .run_reader import CycleData

METRIC_NAMES = {CLASSIFIER: "val AUC", DETECTOR: "val mAP@0.5"}
"""The metric each kind keeps its best epoch by (classifier: AUC, accuracy where AUC is undefined)."""


def history_rows(record: dict) -> list[dict]:
    """A fold's ``history.json`` as one row per epoch with ``train_loss``, ``val_loss`` and ``metric``:
    the normalized ``curve`` detectors write (``tasks.detector.epoch_curve``), else the classifier's
    own rows, which have those keys already."""
    rows = record.get("curve") or record.get("history") or []
    return [r for r in rows if isinstance(r, dict) and not r.get("final")]


def fold_curves(d: CycleData, gen: int, task: str) -> dict[int, list[dict]]:
    """Fold -> its epoch rows, for the folds of ``gen``/``task`` that wrote a history."""
    out = {}
    for fold in range(d.cfg.folds.k):
        path = d.layout.fold(gen, task, fold) / HISTORY
        if path.exists():
            rows = history_rows(read_json(path))
            if rows:
                out[fold] = rows
    return out


def _values(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=np.float64)


def curves_panel(axes, curves: dict[int, list[dict]], title: str, metric_name: str) -> None:
    """Two axes: train (solid) and validation (dashed) loss per fold; the validation metric per fold."""
    loss_ax, metric_ax = axes
    for fold, rows in curves.items():
        color = COLORS[fold % len(COLORS)]
        epochs = [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]
        loss_ax.plot(epochs, _values(rows, "train_loss"), "o-", color=color, ms=2.5, lw=1.2, label=f"fold {fold} train")
        loss_ax.plot(epochs, _values(rows, "val_loss"), "s--", color=color, ms=2.5, lw=1.2, label=f"fold {fold} val")
        metric_ax.plot(epochs, _values(rows, "metric"), "o-", color=color, ms=2.5, lw=1.2, label=f"fold {fold}")
    loss_ax.set(title=f"{title}: loss", xlabel="epoch")
    metric_ax.set(title=f"{title}: {metric_name}", xlabel="epoch", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator

    last = max((int(r.get("epoch", i + 1)) for rows in curves.values() for i, r in enumerate(rows)), default=1)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, last + 0.5)
    for ax in axes:
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)


def curves_section(d: CycleData, r: Report) -> None:
    """Per task, the teacher's (generation c-1) and the student's (generation c) fold curves."""
    r.section("training", "Training curves")
    found, missing, data = [], [], {}
    for task in (CLASSIFIER, DETECTOR):
        for gen, role in ((d.cycle - 1, "teacher"), (d.cycle, "student")):
            curves = fold_curves(d, gen, task)
            if curves:
                found.append((task, gen, role, curves))
                data[f"{task}/gen{gen}"] = {str(k): v for k, v in curves.items()}
            elif task == CLASSIFIER or d.has_boxes:
                missing.append(f"{task} generation {gen} ({role}): "
                               + ("still training or not trained yet" if role == "student" else "no history.json"))
    if found:
        fig, axes = panels(2 * len(found), ncols=4, width=2.9, height=2.3)
        for i, (task, gen, role, curves) in enumerate(found):
            curves_panel(axes[2 * i:2 * i + 2], curves, f"{task} g{gen} {role}", METRIC_NAMES[task])
        r.add("<p>Per fold: training loss (solid) and validation loss (dashed) on its held-out fold, and the "
              "validation metric the fold kept its best epoch by. A flat loss or a metric at chance means the fold "
              "model learned nothing, and its pseudo labels are guesses.</p>", figure_html(fig, "training curves"))
    if missing:
        r.add("<p class='collapsed'>No curves for " + esc("; ".join(missing)) + ".</p>")
    r.data["training_curves"] = data
