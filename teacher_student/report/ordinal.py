"""The report's section on the ordinal grader (runs whose ``run.tasks`` include "grader").

What a reader needs to trust a cycle's pseudo grades: how well the teacher grades out of fold (QWK
with the thresholds it will use, against plain rounding), where it errs (the OOF confusion matrix:
a grader that is right only about the commonest grade shows it at once), the thresholds the
selection used (the ensemble's, and each student fold's, read on the other folds' OOF), and how
many pseudo grades each grade kept, balanced and fell back on, with their agreement with the
pool's hidden truth when the run has one. Everything is read from the files the grader's stages
wrote (paths from :class:`RunLayout`); a run without a grader gets no section.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...datasets.atomic import read_json, read_table
from ...datasets.grades import GRADE, grades_of
from ..layout import GRADE_PSEUDO, GRADE_PSEUDO_INFO, GRADE_SELECTION, GRADE_THRESHOLDS, GRADER, OOF
from ..ordinal import grade_label, ordinal_metrics
from .figures import COLORS, panels
from .html import Report, figure_html, fmt, html_table
from .run_reader import CycleData, optional_json, optional_table


def ordinal_section(d: CycleData, r: Report) -> None:
    """Teacher OOF QWK, confusion matrix, thresholds, and per-grade kept counts of cycle ``d.cycle``."""
    pseudo_dir, teacher = d.layout.pseudo(d.cycle), d.layout.predictions(d.cycle - 1, GRADER)
    info = optional_json(pseudo_dir / GRADE_PSEUDO_INFO)
    if info is None or not (teacher / OOF).exists() or GRADE not in d.table.items:
        return
    k = len(info.get("margins") or []) or int(d.cfg.grader.num_grades)
    folds = {f: rec for f in range(d.cfg.folds.k)
             if (rec := optional_json(d.layout.pseudo_fold(d.cycle, f) / GRADE_PSEUDO_INFO)) is not None}
    names = [grade_label(g) for g in range(k)]
    oof = read_table(teacher / OOF)
    metrics = ordinal_metrics(grades_of(d.table, oof["image_id"]), oof["expected"].to_numpy(np.float64),
                              predicted=oof["grade"].to_numpy(int), num_grades=k)
    r.section("grader", "Ordinal grader: OOF QWK, confusion, thresholds, pseudo grades per grade")
    r.add(f"<p>Teacher (generation {d.cycle - 1}) out of fold: QWK <b>{fmt(metrics['qwk'])}</b> with the OOF-chosen "
          f"thresholds (each fold cut by thresholds read on the other folds), {fmt(metrics['qwk_rounded'])} by plain "
          f"rounding; exact {fmt(metrics['accuracy'])}, within one grade {fmt(metrics['within_one'])}, mean absolute "
          f"error of the expected grade {fmt(metrics['mae'])} (n = {metrics['n']}).</p>")
    r.add("<h3>OOF confusion matrix (rows: true grade, columns: predicted)</h3>", confusion_html(metrics["confusion"], names))
    thresholds = threshold_rows(info, folds, read_json(teacher / GRADE_THRESHOLDS) if (teacher / GRADE_THRESHOLDS).exists() else {})
    r.add("<h3>Thresholds on the expected grade</h3>", html_table(thresholds))
    rows = per_grade_rows(info, folds, optional_table(pseudo_dir / GRADE_PSEUDO), names)
    r.add("<h3>Pseudo grades per grade (ensemble selection; students: summed over their folds' own selections)</h3>",
          html_table(rows), scores_figure(oof, optional_table(pseudo_dir / GRADE_SELECTION), info["thresholds"]))
    r.data["grader"] = {"oof": metrics, "thresholds": thresholds, "per_grade": rows,
                        "starving": info.get("starving"), "precision": info.get("precision"),
                        "within_one": info.get("within_one")}


def confusion_html(matrix: list[list[int]], names: list[str]) -> str:
    """The confusion matrix as a table, the diagonal (right grades) in bold."""
    head = "<tr><th></th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    body = "".join(f"<tr><th>{names[i]}</th>" + "".join(f"<td>{'<b>%d</b>' % v if i == j else v}</td>"
                                                         for j, v in enumerate(row)) + "</tr>"
                   for i, row in enumerate(matrix))
    return f"<table>{head}{body}</table>"


def threshold_rows(info: dict, folds: dict[int, dict], fitted: dict) -> list[dict]:
    """One row per set of thresholds: the selection's (ensemble and each student fold) and the
    cross-fitted ones the teacher's OOF grades were cut with."""
    def row(what: str, values) -> dict:
        return {"thresholds": what, **{f"t{i + 1}": v for i, v in enumerate(values or [])}}

    rows = [row("selection: ensemble (all OOF)", info.get("thresholds"))]
    rows += [row(f"selection: student fold {f} (OOF of folds {rec.get('threshold_oof_folds')})", rec.get("thresholds"))
             for f, rec in sorted(folds.items())]
    rows += [row(f"teacher OOF grades, fold {f}", t) for f, t in sorted((fitted.get("cross_fitted") or {}).items())]
    return rows


def per_grade_rows(info: dict, folds: dict[int, dict], balanced: pd.DataFrame | None, names: list[str]) -> list[dict]:
    """Per grade: OOF support, margin needed, kept, after balancing, students' total, hidden-truth agreement."""
    copies = balanced.groupby("label")["copies"].sum() if balanced is not None and len(balanced) else pd.Series(dtype=int)
    students = {n: sum((rec.get("kept_per_grade") or {}).get(n, 0) for rec in folds.values()) for n in names}
    margins = info.get("margins") or [None] * len(names)
    return [{"grade": n, "oof support": (info.get("support") or {}).get(n), "margin needed": margins[g],
             "kept": (info.get("kept_per_grade") or {}).get(n, 0), "after balance": int(copies.get(n, 0)),
             "students kept": students.get(n, 0), "starving": (info.get("starving") or {}).get(n, ""),
             "truth precision": (info.get("precision_per_grade") or {}).get(n)} for g, n in enumerate(names)]


def scores_figure(oof: pd.DataFrame, selection: pd.DataFrame | None, thresholds: list[float]) -> str:
    """Expected grades, labeled (OOF) vs the pool, with the thresholds that cut them."""
    fig, (ax,) = panels(1, width=6.4, height=2.4)
    pool = selection["expected"].to_numpy(np.float64) if selection is not None and len(selection) else np.zeros(0)
    top = max(len(thresholds), 1)
    ax.hist([oof["expected"].to_numpy(np.float64), pool], bins=np.linspace(0, top, 4 * top + 1), density=True,
            color=COLORS[:2], label=["labeled (OOF)", "unlabeled pool"])
    for t in thresholds:
        ax.axvline(t, color="k", ls="--", lw=1)
    ax.set_xlabel("expected grade (dashed: thresholds)", fontsize=8)
    ax.legend(fontsize=7)
    return figure_html(fig, "expected grade histograms with thresholds")
