"""The report's mask section: how far a cycle's pseudo masks can be trusted.

Evidence, as for class labels: the teacher's OOF dice (where the truth is known) at the pixel
threshold the selection used, the confidence of the pool's pseudo masks against the threshold read
on OOF, how much the fold models agree, and thumbnails with the kept and the rejected pseudo masks
drawn over their images. Read from the cycle's ``pseudo/`` folder and the teacher's predictions
(paths from :class:`~teacher_student.layout.RunLayout`). Runs without a classifier (the segmenter
alone) get a page of their own, ``cycle<c>/masks.html``, built from this section only.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...datasets.atomic import atomic_path, read_json, read_table, write_json
from ...loops.seg_metrics import dice_per_image
from .. import mask_pseudo as mp
from ..layout import MASK_PSEUDO, MASK_PSEUDO_INFO, MASK_PSEUDO_PROBS, OOF_MASKS, SEGMENTER, RunLayout
from ..tasks.segmenter_select import load_npz
from .figures import COLORS, THUMB_PX, panels
from .html import Report, clean_json, esc, figure_html, fmt, html_table, page, png_uri, tile

MASK_REPORT = "masks.html"
THUMBS_PER_KIND = 6


def has_masks(run_dir: Path, cycle: int) -> bool:
    return (RunLayout(run_dir).pseudo(cycle) / MASK_PSEUDO).exists()


def overlay_png(image: np.ndarray, prob: np.ndarray, threshold: float, color: str) -> bytes:
    """A thumbnail with the mask's outline and a light fill over the grey image."""
    from PIL import Image

    size = THUMB_PX
    grey = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32)
    mask = np.asarray(Image.fromarray(mp.to_uint8(prob)).resize((size, size), Image.BILINEAR)) >= threshold * 255
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    tint = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], np.float32)
    rgb[mask] = 0.7 * rgb[mask] + 0.3 * tint
    rgb[edge] = tint
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).quantize(colors=32).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def histograms(oof_dice: np.ndarray, conf: np.ndarray, kept: np.ndarray, threshold: float | None,
               agreement: np.ndarray | None) -> str:
    fig, axes = panels(3 if agreement is not None else 2, width=3.4)
    axes[0].hist(oof_dice, bins=20, range=(0, 1), color=COLORS[0])
    axes[0].set_title("teacher OOF dice per image", fontsize=9)
    axes[1].hist([conf[kept], conf[~kept]], bins=20, range=(0, 1), stacked=True, color=[COLORS[2], COLORS[1]],
                 label=["kept", "rejected"])
    if threshold is not None:
        axes[1].axvline(threshold, color="k", lw=1)
    axes[1].set_title("pseudo-mask confidence (pool)", fontsize=9)
    axes[1].legend(fontsize=7)
    if agreement is not None:
        axes[2].hist(agreement, bins=20, range=(0, 1), color=COLORS[3])
        axes[2].set_title("fold x view agreement (mean pairwise dice)", fontsize=9)
    return figure_html(fig, "mask dice and confidence histograms")


def student_rows(pseudo_dir: Path) -> list[dict]:
    """What the students trained on: the per-fold selections (``fold<k>/``, each from its own
    teacher fold), summed -- the ensemble's file above them is for the report and the exports."""
    infos = [read_json(d / MASK_PSEUDO_INFO) for d in sorted(Path(pseudo_dir).glob("fold*")) if (d / MASK_PSEUDO_INFO).is_file()]
    rows = [{"what": "students' pseudo masks (all folds)", "value": sum(int(i.get("kept", 0)) for i in infos)}]
    measured = [(i["precision"], i.get("truth_images") or 0) for i in infos if i.get("precision") is not None]
    if measured and sum(n for _, n in measured):
        rows.append({"what": "students' pseudo masks: dice against hidden truth",
                     "value": fmt(sum(p * n for p, n in measured) / sum(n for _, n in measured))})
    return rows


def mask_section(run_dir: Path, cycle: int, r: Report, load) -> None:
    """Add the mask section for ``cycle`` to ``r`` (HTML and ``r.data['masks']``)."""
    layout = RunLayout(run_dir)
    pseudo_dir = layout.pseudo(cycle)
    info = read_json(pseudo_dir / MASK_PSEUDO_INFO)
    rows = read_table(pseudo_dir / MASK_PSEUDO)
    stored = load_npz(pseudo_dir / MASK_PSEUDO_PROBS)
    teacher = layout.predictions(cycle - 1, SEGMENTER)
    t = info["pixel_threshold"]
    oof = load_npz(teacher / OOF_MASKS)
    cfg_size = stored["probs"].shape[-1] if len(stored["probs"]) else None
    oof_dice = np.zeros(0)
    if len(oof["image_id"]) and cfg_size:
        from ...datasets.mask_cache import MaskCache

        try:
            masks = MaskCache(_cache_root(run_dir), cfg_size)
            truth = np.stack([masks.load(str(i)) for i in oof["image_id"]]).astype(bool)
            oof_dice = dice_per_image(mp.from_uint8(oof["views"]).mean(axis=0) >= t, truth)
        except Exception:  # noqa: BLE001 -- a missing cache only loses this histogram
            oof_dice = np.zeros(0)
    probs = mp.from_uint8(stored["probs"])
    kept = rows["kept"].astype(bool).to_numpy()
    conf = rows["confidence"].to_numpy(float)
    views = mp.from_uint8(oof["views"])
    agreement = mp.model_agreement(views, pixel_threshold=t) if views.shape[0] > 1 and len(oof["image_id"]) else None
    r.section("masks", "Pseudo masks")
    r.para(f"Pixel threshold {fmt(t, 2)} (read on OOF), confidence rule '{esc(info['confidence'])}', threshold "
           f"{fmt(info.get('confidence_threshold'))} for a mean OOF dice of {fmt(info['target_dice'], 2)} "
           f"({info['support']} OOF images above it{', weak evidence' if info.get('weak_evidence') else ''}). "
           f"Kept {info['kept']} of {info['candidates']} pool images"
           + (f"; dice against the pool's hidden truth {fmt(info.get('precision'))}" if info.get("precision") is not None
              else "") + ".")
    table = [{"what": "teacher OOF dice (mean per image)", "value": fmt(float(oof_dice.mean())) if len(oof_dice) else "-"},
             {"what": "OOF dice of images above the confidence threshold", "value": fmt(info.get("oof_dice_kept"))},
             {"what": "fold agreement on OOF (views)", "value": fmt(float(agreement.mean())) if agreement is not None else "-"},
             *student_rows(pseudo_dir)]
    r.add(html_table(table))
    if len(conf):
        r.add(histograms(oof_dice, conf, kept, info.get("confidence_threshold"), agreement))
    tiles = []
    ids = [str(i) for i in stored["image_id"]]
    order = np.argsort(-conf, kind="stable")
    for label, want, color in (("kept", True, COLORS[2]), ("rejected", False, COLORS[1])):
        for n in [n for n in order if kept[n] == want][:THUMBS_PER_KIND]:
            try:
                uri = png_uri(overlay_png(np.asarray(load(ids[n])), probs[n], t, color)) if load else None
            except Exception:  # noqa: BLE001
                uri = None
            tiles.append(tile(uri, f"{label} {esc(ids[n][:12])} conf {conf[n]:.2f}"))
    if tiles:
        r.add("<h3>Kept (green) and rejected (red) pseudo masks, most confident first</h3>",
              "<div class='grid'>" + "".join(tiles) + "</div>")
    r.data["masks"] = {k: info.get(k) for k in ("pixel_threshold", "confidence", "confidence_threshold", "support",
                                                "kept", "candidates", "precision", "oof_dice", "weak_evidence")}
    r.data["masks"]["oof_dice_histogram"] = np.histogram(oof_dice, bins=10, range=(0, 1))[0].tolist()
    r.data["masks"]["confidence_histogram"] = np.histogram(conf, bins=10, range=(0, 1))[0].tolist()


def _cache_root(run_dir: Path) -> Path:
    from .run_reader import load_run_config

    cfg, _ = load_run_config(run_dir)
    return RunLayout(run_dir, cfg.run.cache_dir).cache


def write_mask_report(run_dir: str | Path, cycle: int, *, load=None) -> Path:
    """``cycle<c>/masks.html`` (+ ``masks.json``): the mask section alone, for runs without a classifier."""
    run_dir = Path(run_dir)
    r = Report()
    mask_section(run_dir, cycle, r, load)
    path = RunLayout(run_dir).cycle(cycle) / MASK_REPORT
    with atomic_path(path) as tmp:
        tmp.write_text(page(f"cycle {cycle} pseudo-mask report",
                            f"<h1>Pseudo-mask quality — cycle {cycle}</h1><p class='meta'>run {esc(run_dir.name)}</p>", r),
                       encoding="utf-8")
    write_json(path.with_suffix(".json"), clean_json(r.data))
    return path
