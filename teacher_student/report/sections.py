"""The report's sections on one teacher: verdicts, confidence, precision, calibration, agreement,
label issues and data quality.

Why one function per section: each reads :class:`CycleData`, adds its HTML to the :class:`Report`
and puts the same numbers under its own key of ``report.json``, so a section can be read, tested
or dropped on its own. Drift across cycles (:mod:`.drift`) and the sample grids (:mod:`.grids`)
have their own modules.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import prob_columns
from ..evaluation import class_members
from .class_stats import box_gt, labeled_oof, student_view, truth_precision_per_class
from .figures import COLORS, Thumbs, curves_figure, panels
from .html import Report, esc, figure_html, fmt, html_table, tile
from .run_reader import CycleData
from .stats import (ECE_BINS, VERDICT_RULES, class_scores, curve_at, expected_calibration_error, fold_spread,
                    label_issues, label_strings, positives, pr_table, reliability_table, top_label)

LABEL_ISSUES_SHOWN = 12
CURVE_GRID = np.round(np.linspace(0.0, 1.0, 51), 4)
HIST_BINS = np.linspace(0.0, 1.0, 21)


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
        predicted = int(class_members(sel["label"], s["name"], d.mode).sum())
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
        box_series, without = [], []
        for k, s in enumerate(box_rows):
            m = d.matched[d.matched["class_id"] == k]
            if m.empty:
                without.append(s["name"])
                continue
            box_series.append((s, pr_table(m["score"].to_numpy(np.float64), m["true_positive"].astype(bool).to_numpy(),
                                           n_positive=int((gt["class_id"] == k).sum()))))
        r.add(f"<h3>Boxes, per class, at IoU {d.cfg.detector.metric_iou:g}</h3>",
              curves_figure(box_series, "box score") if box_series else "<p>No OOF box of any class.</p>")
        if without and box_series:
            r.add(f"<p class='collapsed'>No OOF box (no curve) for {len(without)} box classes: {esc(', '.join(without))}.</p>")
        r.data["precision_curves"]["boxes"] = {s["name"]: sampled(curve) for s, curve in box_series}
        r.data["precision_curves"]["boxes_without_oof"] = without


def sampled(curve: pd.DataFrame) -> dict:
    """A curve read at fixed thresholds (0, 0.02, ..., 1), compact and comparable across cycles."""
    points = [curve_at(curve, t) for t in CURVE_GRID]
    return {"threshold": CURVE_GRID, "precision": [p["precision"] for p in points],
            "recall": [p["recall"] for p in points], "kept": [p["kept"] for p in points]}


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
    n_plots = 1 + int(d.has_boxes and d.fused is not None and len(d.fused) > 0)
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


def has_data(row: dict) -> bool:
    """A verdict row with something to judge: pseudo labels kept, or OOF predictions at its threshold."""
    return bool(row["kept"]) or bool(row["oof_n"])


def display_row(row: dict) -> dict:
    """A verdict row with short column names (the JSON keeps the long ones), so the table fits a screen."""
    ci = "–" if not np.isfinite(row["ci_low"]) else f"{row['ci_low']:.2f}-{row['ci_high']:.2f}"
    return {"kind": row["kind"], "name": row["name"], "verdict": row["verdict"], "threshold": row["threshold"],
            "evidence": row["evidence"], "OOF prec.": row["oof_precision"], "95% CI": ci, "OOF n": row["oof_n"],
            "recall": row["oof_recall"], "ECE": row["ece"], "kept": row["kept"], "balanced": row["after_balance"],
            "truth prec.": row["truth_precision"], "rule": row["rule"]}


def collapsed_line(rows: list[dict], what: str) -> str:
    """One line for the classes without data, instead of a table row (or panel) each."""
    if not rows:
        return ""
    names = ", ".join(esc(r["name"]) for r in rows)
    return (f"<p class='collapsed'>{len(rows)} {what} without data (nothing kept and no OOF prediction at the "
            f"threshold, mostly threshold 'never'): {names}.</p>")


def verdict_section(d: CycleData, r: Report, class_rows: list[dict], box_rows: list[dict], target: float, box_target: float) -> None:
    """The verdict table first, with the rules that decided it: what a reader acts on. Classes
    without data share one line below the table."""
    r.section("verdict", "Verdict per class")
    shown = [display_row(row) for row in class_rows + box_rows if has_data(row)]
    cols = list(shown[0]) if shown else []
    empty_classes = [row for row in class_rows if not has_data(row)]
    empty_boxes = [row for row in box_rows if not has_data(row)]
    r.add(f"<p>Targets: class precision {target:.2f}" + (f", box precision {box_target:.2f}" if box_rows else "") +
          ". Precision and recall are read on out-of-fold predictions at the threshold this cycle used ('never': "
          "no score reaches the target precision); 'evidence' is how many OOF predictions the threshold was read "
          "from, in red under the run's minimum. This table judges the whole ensemble's selection; the headline "
          "counts what the fold students trained on.</p>",
          html_table(shown, cols) if shown else "<p>No class has data to judge.</p>",
          collapsed_line(empty_classes, "classes"), collapsed_line(empty_boxes, "box classes"))
    rules = "".join(f"<li><b>{esc(w)}</b>: {esc(t)}</li>" for w, t in VERDICT_RULES)
    r.add(f"<details><summary>How the verdict is decided (checked in this order)</summary><ol>{rules}</ol></details>")
    r.data["verdicts"] = {"rules": dict(VERDICT_RULES), "target_precision": target, "box_target_precision": box_target,
                          "classes": class_rows, "boxes": box_rows,
                          "without_data": [row["name"] for row in empty_classes + empty_boxes]}
