"""The sample-grid section: thumbnails of the pseudo labels a human should look at first.

Why these images: per class, the most confident kept ones (is the teacher right when it is
sure?), the ones nearest the threshold (is the threshold in the right place?) and the ones the fold
models disagree on most (guesses of one model, not of the ensemble); per box class the same with
the fused boxes drawn.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..evaluation import class_members
from .class_stats import box_thresholds_used
from .figures import COLORS, Thumbs
from .html import Report, esc, fmt, tile
from .run_reader import CycleData

GRID_N = 6
BOX_GRID_N = 4


def class_grid_rows(d: CycleData, name: str, spread: pd.Series) -> dict[str, pd.DataFrame]:
    """Unlabeled images predicted ``name``: most confident kept, nearest the threshold, folds disagreeing most."""
    sel = d.selection[class_members(d.selection["label"], name, d.mode)].copy()
    sel["fold_std"] = sel["image_id"].map(spread).astype(float)
    sel["margin"] = (sel["confidence"] - sel["threshold"].astype(float)).abs()
    return {"confident": sel[sel["kept"].astype(bool)].nlargest(GRID_N, "confidence"),
            "borderline": sel.nsmallest(GRID_N, "margin"),
            "folds disagree": sel.dropna(subset=["fold_std"]).nlargest(GRID_N, "fold_std")}


def grids_section(d: CycleData, r: Report, thumbs: Thumbs, spread: pd.Series) -> None:
    """Sample grids per study class and per box class, with pseudo boxes drawn and scores. Rows
    without an image are left out, classes without any in one line, and the colour legend names
    only the box classes drawn."""
    r.section("grids", "Sample grids")
    kept_boxes = d.box_pseudo.assign(kind="kept") if d.has_boxes else None
    shown, parts, empty = {}, [], []
    for name in d.classes:
        rows_html = []
        for label, rows in class_grid_rows(d, name, spread).items():
            tiles = [tile(thumbs.render(row.image_id, _boxes_of(kept_boxes, row.image_id)),
                          f"{esc(row.image_id)}<br>p={row.confidence:.2f} {'kept' if row.kept else 'filtered'}"
                          f"<br>fold sd {fmt(row.fold_std, 2)}") for row in rows.itertuples()]
            if tiles:
                rows_html.append(f'<div class="row-label">{esc(label)}</div><div class="grid">{"".join(tiles)}</div>')
            shown.setdefault(name, {})[label] = rows["image_id"].tolist()
        if rows_html:
            parts.append(f"<h3>{esc(name)}</h3>" + "".join(rows_html))
        else:
            empty.append(name)
    drawn = set(kept_boxes["class_id"].astype(int)) if kept_boxes is not None and len(kept_boxes) else set()
    legend = " ".join(f'<span style="color:{COLORS[k % len(COLORS)]}">&#9632; {esc(n)}</span>'
                      for k, n in enumerate(d.table.box_classes) if k in drawn)
    r.add("<p>Unlabeled images predicted as each class; kept pseudo boxes are drawn with their score"
          f"{' (colour = box class: ' + legend + ')' if legend else ''}; yellow = a candidate box that was not kept. "
          "Captions: image id, teacher probability, kept or filtered, fold spread.</p>", *parts)
    if empty:
        r.add(f"<p class='collapsed'>No unlabeled image is predicted as {esc(', '.join(empty))}.</p>")
    if d.has_boxes and d.fused is not None:
        shown.update(box_grids(d, r, thumbs, kept_boxes))
    if thumbs.failures:
        r.para(f"Thumbnails could not be loaded for {len(thumbs.failures)} image(s); first: {thumbs.failures[0]}", "note")
    r.data["grids"] = {"shown": shown, "thumbnail_failures": thumbs.failures[:20], "classes_without_images": empty}


def _boxes_of(boxes: pd.DataFrame | None, image_id: str) -> pd.DataFrame | None:
    return None if boxes is None else boxes[boxes["image_id"] == image_id]


def box_grids(d: CycleData, r: Report, thumbs: Thumbs, kept_boxes: pd.DataFrame) -> dict:
    """Per box class: highest-scoring kept boxes, fused boxes nearest the threshold, least supported
    boxes; classes without any such box share one line."""
    thresholds = box_thresholds_used(d)
    fused = d.fused[d.fused["image_id"].isin(set(d.box_images["image_id"]) if d.box_images is not None else set())]
    shown, empty = {}, []
    for k, name in enumerate(d.table.box_classes):
        f = fused[fused["class_id"] == k].assign(margin=lambda x: (x["score"] - thresholds[k]).abs())
        picks = {"confident": kept_boxes[kept_boxes["class_id"] == k].nlargest(BOX_GRID_N, "score"),
                 "borderline": f.nsmallest(BOX_GRID_N, "margin") if np.isfinite(thresholds[k]) else f.iloc[:0],
                 "folds disagree": f[f["score"] >= 0.5 * min(thresholds[k], 1.0)].sort_values(
                     ["n_models", "score"], ascending=[True, False]).head(BOX_GRID_N)}
        rows_html = []
        for label, rows in picks.items():
            tiles = []
            for row in rows.itertuples():
                one = pd.DataFrame([row._asdict()]).assign(kind="kept" if label == "confident" else "candidate")
                tiles.append(tile(thumbs.render(row.image_id, one),
                                  f"{esc(row.image_id)}<br>score {row.score:.2f}<br>{int(getattr(row, 'n_models', 0))} models"))
            if tiles:
                rows_html.append(f'<div class="row-label">{esc(label)}</div><div class="grid">{"".join(tiles)}</div>')
            shown.setdefault(f"box:{name}", {})[label] = rows["image_id"].tolist()
        if rows_html:
            r.add(f"<h3>box class {esc(name)} (threshold {fmt(thresholds[k], 2)})</h3>", *rows_html)
        else:
            empty.append(name)
    if empty:
        r.add(f"<p class='collapsed'>No kept or candidate pool box for {len(empty)} box classes: {esc(', '.join(empty))}.</p>")
    return shown
