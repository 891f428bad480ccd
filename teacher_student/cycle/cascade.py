"""The final classification -> segmentation cascade (SIIM-ACR's recipe): P(positive) gates the mask.

An EfficientNet-style classifier decides whether there is a finding; only then does the segmenter's
mask stand. Without the gate a segmenter draws a few false pixels on many negative images, and
each such image scores dice 0 where an empty answer scores 1. The gate threshold and the pixel
threshold are tuned together on OOF predictions (never on the test part) for the best mean
per-image dice, empty images included; hard (below the threshold: empty) and soft (mask
probability x P(positive)) modes, as the detector's gate has.

Writes ``<out>/cascade/``: ``cascade.json`` (thresholds, dice with and without the gate, OOF and
test), ``masks_raw/`` and ``masks_gated/`` (PNGs at the source image's size) and
``mask_submission_{raw,gated}.csv`` (SIIM-ACR ``ImageId,EncodedPixels``, ``-1`` for empty) for the
test part (or the pool when there is none).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ...datasets.atomic import write_json, write_table
from ...datasets.config import config_to_dict
from ...datasets.masks import rle_encode, write_mask_png
from ...loops.seg_metrics import dice_per_image
from ...loops.stages import file_digest
from .. import mask_pseudo as mp
from ..context import RunContext
from ..layout import CASCADE, CLASSIFIER, MASK_PNGS, MASK_SUBMISSION, POOL_MASKS, SEGMENTER
from ..tasks.detector import p_abnormal
from ..tasks.segmenter import SegmenterTask
from ..tasks.segmenter_select import load_npz


def cascade_spec(ctx: RunContext, task: SegmenterTask, preds: dict[str, Path]):
    """``(stage_dir, payload, fn)`` of the cascade stage on the last generation's predictions (the
    runner and ``run --only cascade`` build it here, so both have one fingerprint)."""
    payload = {"seg": file_digest(preds[SEGMENTER]),
               "cls": file_digest(preds[CLASSIFIER]) if CLASSIFIER in preds else None,
               "cascade": config_to_dict(ctx.cfg.segmenter.cascade), "pixel": ctx.cfg.segmenter.pixel_threshold,
               "rle": ctx.cfg.data.mask_rle}
    return ctx.layout.cascade, payload, lambda d: run_cascade(ctx, task, preds, d)


def cascade_stage(ctx: RunContext, task: SegmenterTask, preds: dict[str, Path]) -> dict | None:
    """Run (or reuse) the cascade stage on the last generation's predictions; return its result."""
    return ctx.stage(*cascade_spec(ctx, task, preds))["result"]


def positive_probability(ctx: RunContext, preds: dict[str, Path], ids: list[str]) -> np.ndarray:
    """The classifier's P(positive) = P(abnormal) of these images (OOF for labeled ones, the fold
    ensemble elsewhere); ones when the run has no classifier or no normal class."""
    if CLASSIFIER not in preds or not ctx.table.normal_class:
        return np.ones(len(ids))
    return p_abnormal(ctx.table, preds[CLASSIFIER]).reindex(ids).fillna(1.0).to_numpy(np.float64)


def run_cascade(ctx: RunContext, task: SegmenterTask, preds: dict[str, Path], out_dir: Path) -> dict:
    cfg, cc = ctx.cfg, ctx.cfg.segmenter.cascade
    has_gate = CLASSIFIER in preds and bool(ctx.table.normal_class)
    mode = cc.mode if has_gate else "off"
    ids, _, views, truth = task.oof_arrays(preds[SEGMENTER])
    oof_probs, p_oof = views.mean(axis=0), positive_probability(ctx, preds, ids)
    fixed_pixel = cfg.segmenter.pixel_threshold or 0.5
    if cc.tune_on_oof and ids:
        best = mp.tune_cascade(oof_probs, truth, p_oof, mode=mode)
        gate, pixel, raw_pixel = best["threshold"], best["pixel_threshold"], best["ungated_pixel_threshold"]
    else:
        gate, pixel, raw_pixel = cc.threshold, fixed_pixel, fixed_pixel
    pool = load_npz(preds[SEGMENTER] / POOL_MASKS)
    pool_ids = [str(i) for i in pool["image_id"]]
    pool_probs = mp.from_uint8(pool["probs"])
    gated = mp.gate_masks(pool_probs, positive_probability(ctx, preds, pool_ids), mode=mode, threshold=gate)
    result = {"mode": mode, "threshold": float(gate), "pixel_threshold": float(pixel),
              "ungated_pixel_threshold": float(raw_pixel), "tuned": bool(cc.tune_on_oof and ids),
              "oof": two_scores(oof_probs, mp.gate_masks(oof_probs, p_oof, mode=mode, threshold=gate), truth,
                                raw_pixel, pixel)}
    masked = task.mask_labeled()
    test = [i for i in ctx.ids("test") if i in masked and i in set(pool_ids)]
    if test:
        rows = [pool_ids.index(i) for i in test]
        truth_test = np.stack([ctx.mask_loader()(i) for i in test]).astype(bool)
        result["test"] = two_scores(pool_probs[rows], gated[rows], truth_test, raw_pixel, pixel)
    write_final_masks(ctx, pool_ids, pool_probs, gated, raw_pixel, pixel, out_dir)
    write_json(out_dir / CASCADE, result)
    return result


def two_scores(raw: np.ndarray, gated: np.ndarray, truth: np.ndarray, raw_pixel: float, pixel: float) -> dict:
    """Mean per-image dice without the gate (at its own best pixel threshold) and with it."""
    if not len(truth):
        return {}
    return {"ungated": float(dice_per_image(raw >= raw_pixel, truth).mean()),
            "gated": float(dice_per_image(gated >= pixel, truth).mean()), "images": int(len(truth)),
            "empty_images": int((~truth.any(axis=(1, 2))).sum())}


def full_size(prob: np.ndarray, width: int, height: int, threshold: float) -> np.ndarray:
    """A cached-size probability map at the source image's size (bilinear), thresholded."""
    return (cv2.resize(prob.astype(np.float32), (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
            >= threshold).astype(np.uint8)


def write_final_masks(ctx: RunContext, pool_ids: list[str], raw: np.ndarray, gated: np.ndarray, raw_pixel: float,
                      pixel: float, out_dir: Path) -> None:
    """PNG masks and SIIM-ACR submissions for the test part (or the unlabeled pool without one)."""
    items = ctx.table.with_role("test")
    if items.empty:
        items = ctx.table.with_role("unlabeled")
    index = {i: n for n, i in enumerate(pool_ids)}
    items = items[items["image_id"].isin(index.keys())]
    relative = ctx.cfg.data.mask_rle == "relative"
    for tag, probs, t in (("raw", raw, raw_pixel), ("gated", gated, pixel)):
        folder = out_dir / MASK_PNGS.format(tag)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for image_id, w, h in zip(items["image_id"], items["width"], items["height"]):
            mask = full_size(probs[index[image_id]], w, h, t)
            write_mask_png(folder / f"{image_id}.png", mask)
            rows.append({"ImageId": image_id, "EncodedPixels": rle_encode(mask, relative=relative)})
        write_table(out_dir / MASK_SUBMISSION.format(tag), pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]))
