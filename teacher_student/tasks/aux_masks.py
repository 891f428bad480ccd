"""Targets of the classifier's auxiliary mask loss (``classifier.aux_mask``): given masks, or masks
drawn from boxes (the SIIM-COVID19 winners drew their opacity boxes as masks).

Only ground truth is used: the labeled images' masks or boxes; pseudo-labeled images (and images
without either) get no mask and weigh 0 in the mask loss, so the auxiliary head never learns a
teacher's guess.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...datasets.adapters import training_boxes
from ...datasets.boxes import BOX_COLUMNS
from ...datasets.masks import boxes_mask
from ...datasets.table import ItemTable
from ..context import RunContext


def aux_masks(ctx: RunContext, table: ItemTable, image_ids: Sequence[str]) -> Callable[[int], np.ndarray | None] | None:
    """``mask_of(sample index) -> 0/1 mask or None`` for ``ClassificationDataset``; None when off."""
    kind, items, ids = ctx.cfg.classifier.aux_mask, table.items, list(image_ids)
    labeled = set(items.loc[items["role"] == "labeled", "image_id"])
    if kind == "off":
        return None
    size = ctx.cfg.preprocess.size
    if kind == "masks":
        masked = set(items.loc[items["mask_labeled"], "image_id"]) & labeled if "mask_labeled" in items else set()
        load = ctx.mask_loader()
        return lambda index: load(ids[index]) if ids[index] in masked else None
    boxed = set(items.loc[items["box_labeled"], "image_id"]) & labeled
    boxes = training_boxes(table)
    by_image = {i: g[BOX_COLUMNS].to_numpy() for i, g in boxes[boxes["image_id"].isin(boxed)].groupby("image_id")}
    return lambda index: (boxes_mask(by_image.get(ids[index], np.zeros((0, 4))), size=size)
                          if ids[index] in boxed else None)
