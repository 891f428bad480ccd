"""The drift section: how pseudo labels and metrics move from one generation to the next.

Why: a teacher that confirms its own mistakes shows it across cycles, not within one -- its pool
labels flip between generations, or the share of the pool it keeps grows while OOF metrics stall.
Metrics are the ones the runner wrote for each generation (``gen<g>/metrics.json``).
"""
from __future__ import annotations

import numpy as np

from ..layout import BOX_IMAGES, BOX_PSEUDO, BOX_PSEUDO_INFO, CLASS_PSEUDO_INFO, CLASS_SELECTION, CLASSIFIER, POOL
from ..summary import dig
from .figures import COLORS, panels
from .html import Report, figure_html, html_table
from .run_reader import CycleData, optional_json, optional_table, selection_table
from .stats import flip_rate, hard_label_strings


def generation_metrics(d: CycleData) -> list[dict]:
    """Metric per generation 0..cycle, as the runner recorded it (``gen<g>/metrics.json``, or
    summary.json for older runs); a generation not recorded yet has no row."""
    out = []
    for g, rec in sorted(d.metrics.items()):
        out.append({"generation": g, "source": rec.get("source"), "model": rec.get("model"),
                    "detector_model": rec.get("detector_model"),
                    "auc_oof": dig(rec, "classifier", "oof", "auc_macro"),
                    "auc_test": dig(rec, "classifier", "test", "auc_macro"),
                    "map_oof": dig(rec, "detector", "oof", "map"), "map_test": dig(rec, "detector", "test", "map")})
    return out


def cycle_drift(d: CycleData) -> tuple[list[dict], list[dict]]:
    """Per cycle 1..c: pool pass rate, kept counts, boxes per image, hidden-truth precision; and the
    share of pool labels that flipped between consecutive generations (0..c, as far as they exist)."""
    rows, labels = [], {}
    for g in range(d.cycle + 1):
        pool = optional_table(d.layout.predictions(g, CLASSIFIER) / POOL)
        if pool is not None:
            pool = pool[pool["image_id"].isin(set(d.unlabeled_ids))]
            labels[g] = hard_label_strings(pool, d.classes, mode=d.mode)
    for k in range(1, d.cycle + 1):
        pdir = d.layout.pseudo(k)
        if not (pdir / CLASS_SELECTION).exists():
            continue
        sel = selection_table(pdir / CLASS_SELECTION)
        info = optional_json(pdir / CLASS_PSEUDO_INFO) or {}
        row = {"cycle": k, "teacher": k - 1, "pool": len(sel), "kept": int(sel["kept"].astype(bool).sum()),
               "pass_rate": float(sel["kept"].astype(bool).mean()) if len(sel) else None,
               "flip_rate": flip_rate(labels[k - 2], labels[k - 1]) if k >= 2 and {k - 2, k - 1} <= labels.keys() else None,
               "truth_precision": info.get("precision")}
        images, boxes = optional_table(pdir / BOX_IMAGES), optional_table(pdir / BOX_PSEUDO)
        if images is not None and boxes is not None and len(images):
            binfo = optional_json(pdir / BOX_PSEUDO_INFO) or {}
            row.update(boxes_per_image=len(boxes) / len(images), negative_rate=float((images["status"] == "negative").mean()),
                       box_truth_precision=binfo.get("precision"))
        rows.append(row)
    flips = [{"from": g - 1, "to": g, "flip_rate": flip_rate(labels[g - 1], labels[g])}
             for g in sorted(labels) if g - 1 in labels]
    return rows, flips


def drift_section(d: CycleData, r: Report) -> None:
    """Flip rate, pool share kept, boxes per image and OOF metric over the generations."""
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
