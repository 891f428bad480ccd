"""``run_cycle.py export --format masks``: a cycle's pseudo masks as PNGs, SIIM-ACR RLE and COCO.

The kept pseudo masks of the ensemble's selection (``cycle<c>/pseudo/``), thresholded at the pixel
threshold that selection read on OOF and resized to each source image's size (bilinear on the
probabilities, then the threshold), written as:

- ``<dest>/masks/<image_id>.png``: 0/255 PNGs;
- ``<dest>/pseudo_masks_rle.csv``: ``ImageId,EncodedPixels`` (SIIM-ACR; the run's data.mask_rle
  encoding, relative by default; ``-1`` for an empty mask);
- ``<dest>/pseudo_masks_coco.json``: COCO with RLE segmentation that pycocotools decodes, each
  annotation with its ``score`` (the image confidence), ``cycle``, ``source`` and ``models``.

The final cascade masks are already in ``<run>/cascade/`` (PNG folders and submissions).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..datasets.atomic import atomic_dir, read_json, read_table, write_table
from ..datasets.errors import DataError
from ..datasets.mask_export import export_coco_masks
from ..datasets.masks import rle_encode, write_mask_png
from ..datasets.table import load_table
from . import mask_pseudo as mp
from .cycle.cascade import full_size
from .layout import MASK_PSEUDO, MASK_PSEUDO_INFO, MASK_PSEUDO_PROBS, RunLayout
from .report.run_reader import load_run_config
from .tasks.segmenter_select import load_npz


def export_masks(run_dir: Path, pseudo_dir: Path, cycle: int, dest: Path) -> Path:
    """Write the three forms of a cycle's kept pseudo masks into ``dest`` (replaced whole)."""
    if not (pseudo_dir / MASK_PSEUDO).exists():
        raise DataError(f"{pseudo_dir}: this run has no pseudo masks (no segmenter in run.tasks)")
    cfg, _ = load_run_config(run_dir)
    table = load_table(RunLayout(run_dir).data)
    info, rows = read_json(pseudo_dir / MASK_PSEUDO_INFO), read_table(pseudo_dir / MASK_PSEUDO, dtype={"models": str})
    stored = load_npz(pseudo_dir / MASK_PSEUDO_PROBS)
    index = {str(i): n for n, i in enumerate(stored["image_id"])}
    sizes = table.items.set_index("image_id")[["width", "height"]]
    kept = rows[rows["kept"].astype(bool)]
    masks, extra, rle_rows = {}, {}, []
    for row in kept.itertuples(index=False):
        w, h = sizes.loc[row.image_id]
        mask = full_size(mp.from_uint8(stored["probs"][index[row.image_id]]), w, h, info["pixel_threshold"])
        masks[row.image_id] = mask
        extra[row.image_id] = {"score": float(row.confidence), "cycle": int(cycle), "source": str(row.source),
                               "models": str(row.models)}
        rle_rows.append({"ImageId": row.image_id,
                         "EncodedPixels": rle_encode(mask, relative=cfg.data.mask_rle == "relative")})
    with atomic_dir(dest) as tmp:
        (tmp / "masks").mkdir(parents=True)
        for image_id, mask in masks.items():
            write_mask_png(tmp / "masks" / f"{image_id}.png", mask)
        write_table(tmp / "pseudo_masks_rle.csv", pd.DataFrame(rle_rows, columns=["ImageId", "EncodedPixels"]))
        export_coco_masks(masks, tmp / "pseudo_masks_coco.json", extra=extra)
    return dest / "pseudo_masks_coco.json"

