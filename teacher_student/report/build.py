"""Building and writing the reports: one page per cycle and the run's index.

Why the sections run in this order: the headline (:mod:`.headline`: what the students got, how
precise it was, what is flagged) and the verdict table come first because they are what a reader
acts on -- both fit the first screen; everything below is the evidence (precision, training
curves, confidence, calibration, agreement, drift, sample grids, label issues, data quality). The
HTML goes to ``RunLayout.report(c)`` and the same numbers to ``RunLayout.report_json(c)``, both
written atomically. The index leads with the run's gains against its baselines.
"""
from __future__ import annotations

import time
from pathlib import Path

from ...datasets.atomic import atomic_path, write_json
from ...datasets.errors import DataError
from ..layout import RunLayout
from ..summary import dig
from .class_stats import box_stats, box_truth_precision, class_stats
from .curves import curves_section
from .drift import drift_section
from .figures import Thumbs
from .grids import grids_section
from .headline import headline_section
from .masks import has_masks, mask_section
from .html import Report, clean_json, esc, fmt, html_table, page
from .ordinal import ordinal_section
from .run_reader import CycleData, Loader, default_loader, optional_json, read_cycle
from .sections import (agreement_section, calibration_section, confidence_section, label_issue_section, pool_spread,
                       pr_section, quality_section, verdict_section)
from .stats import DEFAULT_TARGET_PRECISION, VERDICT_RULES


def build_report(d: CycleData, load: Loader | None, load_problem: str | None, target_precision: float | None,
                 status: str | None = None) -> Report:
    """Every section of one cycle's report, headline and verdicts first; ``load_problem`` says why
    thumbnails are missing, ``status`` is shown in the headline (e.g. "its student is training")."""
    target = target_precision or d.cfg.pseudo.target_precision or DEFAULT_TARGET_PRECISION
    box_target = target_precision or d.cfg.detector.target_precision
    r = Report()
    class_rows = class_stats(d, target)
    box_truth = box_truth_precision(d)
    box_rows = box_stats(d, box_target, box_truth) if d.has_boxes else []
    headline_section(d, r, class_rows, box_rows, status)
    verdict_section(d, r, class_rows, box_rows, target, box_target)
    pr_section(d, r, class_rows, box_rows)
    curves_section(d, r)
    confidence_section(d, r, class_rows)
    calibration_section(d, r)
    spread = pool_spread(d)
    agreement_section(d, r, spread)
    if d.has_boxes and d.box_images is not None:
        status = d.box_images["status"].value_counts().to_dict()
        r.add("<h3>Pseudo-box images by status</h3>", html_table([{"status": k, "images": int(v)} for k, v in status.items()]))
        r.data["box_images"] = {k: int(v) for k, v in status.items()}
    ordinal_section(d, r)
    drift_section(d, r)
    thumbs = Thumbs(load, d.table.box_classes, load_problem)
    grids_section(d, r, thumbs, spread)
    label_issue_section(d, r, thumbs)
    quality_section(d, r, box_truth)
    if has_masks(d.run_dir, d.cycle):
        mask_section(d.run_dir, d.cycle, r, load)
    return r


def write_cycle_report(run_dir: str | Path, cycle: int, *, load: Loader | None = None,
                       target_precision: float | None = None, status: str | None = None) -> Path:
    """Write ``<run>/cycle<c>/report.html`` and ``report.json`` for one cycle; return the HTML path.

    Args:
        run_dir: the run directory (``run.out``).
        cycle: the cycle (>= 1) whose pseudo labels to judge.
        load: image id -> uint8 image, for the thumbnails; None: the run's preprocessing cache.
            When images cannot be loaded the grids say so and the rest of the report is unchanged.
        target_precision: the precision a class must reach to be trusted; None: the run's
            ``pseudo.target_precision`` (``detector.target_precision`` for boxes), else 0.8.
        status: a line for the headline, e.g. that the cycle's student is still training.

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
    r = build_report(d, load, problem, target_precision, status)
    teacher = dig(d.metrics.get(cycle - 1), "model")
    seconds = time.perf_counter() - start
    header = (f"<h1>Pseudo-label quality — cycle {cycle}</h1><p class='meta'>run {esc(d.run_dir.name)} · teacher: "
              f"generation {cycle - 1}{' (' + esc(teacher) + ')' if teacher else ''} · labels: {esc(d.mode)} · "
              f"built {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.1f} s</p>" +
              "".join(f"<p class='note'>{esc(n)}</p>" for n in d.notes))
    text = page(f"cycle {cycle} pseudo-label report", header, r)
    with atomic_path(d.layout.report(cycle)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    r.data.update(cycle=cycle, teacher_generation=cycle - 1, label_mode=d.mode, notes=d.notes, status=status,
                  build={"seconds": round(seconds, 3), "html_bytes": len(text.encode("utf-8"))})
    write_json(d.layout.report_json(cycle), clean_json(r.data))
    return d.layout.report(cycle)


def write_index(run_dir: str | Path) -> Path:
    """Write ``<run>/index.html``: the gains against the baselines, every cycle's headline with a
    link to its report, and the per-generation table with the reference models."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    summary = optional_json(layout.summary) or {}
    r = Report()
    gains = gain_rows(summary.get("gains") or {})
    r.section("gains", "What the pseudo labels gave (held-out test)")
    if gains:
        r.add("<p>The last student against the cycle-0 teacher, the <b>ablation</b> (the student's recipe on the labeled "
              "images only: <i>student - ablation</i> is what the pseudo labels gave) and the <b>oracle</b> (the same "
              "recipe on every label, trained longer: the ceiling <i>gap closed</i> is read against).</p>",
              html_table(gains))
    else:
        r.para("No gains yet: summary.json is written when the run ends (and needs a held-out test part)." if not summary
               else "No gains: the run has no held-out test part, or only cycle 0.")
    r.section("cycles", "Cycle reports")
    rows = []
    for c in layout.cycles_with_pseudo_labels():
        info = optional_json(layout.report_json(c)) or {}
        verdicts = [v["verdict"] for v in dig(info, "verdicts", "classes") or []] + \
                   [v["verdict"] for v in dig(info, "verdicts", "boxes") or []]
        counts = ", ".join(f"{w} {verdicts.count(w)}" for w, _ in VERDICT_RULES if verdicts.count(w))
        report = layout.report(c)
        link = (f'<a href="{report.relative_to(layout.root).as_posix()}">cycle {c} report</a>' if report.exists()
                else f"cycle {c}: report not built")
        flags = dig(info, "headline", "flags") or []
        flag_cell = (f"<ul class='flags'>{''.join(f'<li>{esc(f)}</li>' for f in flags[:3])}</ul>"
                     + (f"<p>... {len(flags) - 3} more flags in the report</p>" if len(flags) > 3 else "")) if flags else "–"
        rows.append(f"<tr><td class='s'>{link}</td><td class='s'>{esc(dig(info, 'headline', 'sentence') or '–')}</td>"
                    f"<td class='s'>{flag_cell}</td><td class='s'>{esc(counts or '–')}</td></tr>")
    r.add("<table><tr><th>report</th><th>what the students got</th><th>flags</th><th>verdicts</th></tr>" + "".join(rows)
          + "</table>" if rows else "<p>No cycle has made pseudo labels yet.</p>")
    r.section("summary", "Summary per generation and reference model")
    r.add(html_table(summary_rows(summary)) if summary else "<p>summary.json is not written yet (the run is not finished).</p>")
    gate = summary.get("gate")
    if gate:
        r.add(f"<p>Gate ({esc(gate.get('mode'))}, low {fmt(gate.get('low'), 2)}, high {fmt(gate.get('high'), 2)}): "
              f"test mAP with 'No finding' {fmt(dig(gate, 'test', 'ungated'))} → {fmt(dig(gate, 'test', 'gated'))}</p>")
    header = f"<h1>Run {esc(run_dir.name)}</h1><p class='meta'>wall time {fmt(summary.get('wall_seconds'), 0)} s</p>"
    with atomic_path(layout.index) as tmp:
        tmp.write_text(page(f"run {run_dir.name}", header, r), encoding="utf-8")
    return layout.index


GAIN_LABELS = {"classifier_auc": "classifier AUC", "detector_map": "detector mAP"}


def gain_rows(gains: dict) -> list[dict]:
    """One row per metric of summary.json's ``gains``; gap closed is a number or its 'undefined' reason."""
    rows = []
    for key, g in gains.items():
        gap = g.get("gap_closed")
        rows.append({"metric": GAIN_LABELS.get(key, key), "teacher": g.get("teacher"), "student": g.get("student"),
                     "ablation": g.get("ablation"), "oracle": g.get("oracle"),
                     "student - ablation": _signed(g.get("student_minus_ablation")),
                     "student - teacher": _signed(g.get("student_minus_teacher")),
                     "gap closed": gap if isinstance(gap, (int, float)) else str(gap or "–")})
    return rows


def _signed(value) -> str:
    """A difference with its sign (+0.080), the way a gain is read."""
    return "–" if value is None else f"{value:+.3f}"


def summary_rows(summary: dict) -> list[dict]:
    """One row per generation, then the ablation and the oracle, from summary.json. Pseudo-label
    counts are what the fold students trained on (summed over folds)."""
    pseudo = {c["cycle"]: c.get("pseudo", {}) for c in summary.get("cycles", [])}
    rows = []
    for g in summary.get("generations", []):
        p = pseudo.get(g["generation"], {})
        rows.append({"generation": g["generation"], "classifier": g.get("model"),
                     "AUC oof": dig(g, "classifier", "oof", "auc_macro"), "AUC test": dig(g, "classifier", "test", "auc_macro"),
                     "detector": g.get("detector_model"), "mAP oof": dig(g, "detector", "oof", "map"),
                     "mAP test": dig(g, "detector", "test", "map"),
                     "pseudo labels": dig(p, "classifier", "students", "total"),
                     "pseudo precision": dig(p, "classifier", "students", "precision"),
                     "pseudo boxes": dig(p, "detector", "students", "total"),
                     "box precision": dig(p, "detector", "students", "precision")})
    for key in ("ablation", "oracle"):
        ref = summary.get(key)
        if ref:
            rows.append({"generation": key, "classifier": ref.get("classifier_model") or ref.get("model"),
                         "AUC oof": dig(ref, "classifier", "oof", "auc_macro"),
                         "AUC test": dig(ref, "classifier", "test", "auc_macro"), "detector": ref.get("detector_model"),
                         "mAP oof": dig(ref, "detector", "oof", "map"), "mAP test": dig(ref, "detector", "test", "map")})
    return rows
