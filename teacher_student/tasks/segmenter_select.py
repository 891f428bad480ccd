"""Choosing pseudo masks: thresholds read on OOF, confidence per pool image, per-fold lineage.

Why its own module: it is the segmenter's counterpart of ``ClassifierTask.select_set`` and
``DetectorTask.select_set`` and reads like them -- one selection function run for the whole
ensemble (what the report and the exports show) and once per fold k from teacher fold k's views
with thresholds from the other folds' OOF predictions (what student fold k trains on).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ...datasets.atomic import atomic_path, write_json, write_table
from ...loops.seg_metrics import dice_per_image
from .. import mask_pseudo as mp
from ..layout import MASK_PSEUDO, MASK_PSEUDO_INFO, MASK_PSEUDO_PROBS, POOL_FOLD_MASKS, SEGMENTER, pseudo_fold_dir

log = logging.getLogger("cxr.cycle")
# ``task`` arguments are a tasks.segmenter.SegmenterTask (named, not imported: it imports this module)


def save_npz(path: Path, **arrays) -> None:
    """Compressed arrays written atomically (the stage's temp dir is swapped in whole, but the
    cascade and exports write outside stages too)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def select_masks(task: SegmenterTask, pred_dir: Path, out_dir: Path, cycle: int) -> dict:
    """The ensemble's selection in ``out_dir`` and each fold's in ``out_dir/fold<k>``; returns the info."""
    ids, folds, oof_views, truth = task.oof_arrays(pred_dir)
    pool = load_npz(pred_dir / POOL_FOLD_MASKS) if (pred_dir / POOL_FOLD_MASKS).exists() else None
    candidates = set(task.candidate_ids())
    index = [n for n, i in enumerate(pool["image_id"]) if str(i) in candidates] if pool is not None else []
    pool_ids = [str(pool["image_id"][n]) for n in index]
    per_fold = mp.from_uint8(pool["views"][:, :, index]) if index else np.zeros((task.cfg.folds.k, 1, 0, 1, 1))
    k = task.cfg.folds.k
    all_tags = [t for f in range(k) for t in task.model_tags(f)]
    info = select_set(task, per_fold.reshape(-1, *per_fold.shape[2:]), pool_ids, oof_views, truth, out_dir,
                      cycle=cycle, models=all_tags, oof_folds=list(range(k)))
    info["folds"] = {}
    for fold in range(k):
        others = [f for f in range(k) if f != fold]
        sel = np.isin(folds, others)
        info["folds"][str(fold)] = select_set(task, per_fold[fold], pool_ids, oof_views[:, sel], truth[sel],
                                              pseudo_fold_dir(out_dir, fold), cycle=cycle,
                                              models=task.model_tags(fold), oof_folds=others)
    info["students"] = student_mask_totals(list(info["folds"].values()))
    return info


def confidences(task: SegmenterTask, model_probs: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(N,) image confidence by the configured rule, from the (M, N, H, W) probabilities of the
    models that made the masks (fold models x views)."""
    if task.cfg.segmenter.confidence == "agreement":
        return mp.model_agreement(model_probs, pixel_threshold=pixel_threshold)
    return mp.mask_confidence(model_probs.mean(axis=0), pixel_threshold=pixel_threshold)


def select_set(task: SegmenterTask, model_probs: np.ndarray, ids: list[str], oof_views: np.ndarray,
               oof_truth: np.ndarray, out_dir: Path, *, cycle: int, models: list[str], oof_folds: list[int]) -> dict:
    """One selection: pixel threshold and confidence threshold on the given OOF predictions, then
    every candidate pool image scored and kept or not (all are written, with ``kept``)."""
    sc = task.cfg.segmenter
    oof_probs = oof_views.mean(axis=0)
    t = sc.pixel_threshold or mp.best_pixel_threshold(oof_probs, oof_truth)[0]
    oof_dice = dice_per_image(oof_probs >= t, oof_truth)
    oof_conf = confidences(task, oof_views, t)
    c = mp.confidence_threshold(oof_conf, oof_dice, target_dice=sc.target_dice) if len(oof_dice) else float("inf")
    support = int((oof_conf >= c).sum())
    probs = model_probs.mean(axis=0) if len(ids) else np.zeros((0, 1, 1), np.float32)
    conf = confidences(task, model_probs, t) if len(ids) else np.zeros(0)
    kept, fallback = conf >= c, None
    if not np.isfinite(c) and sc.fallback_k > 0 and len(ids):
        kept = np.zeros(len(ids), bool)
        kept[np.argsort(-conf, kind="stable")[: sc.fallback_k]] = True
        fallback = int(kept.sum())
    rows = pd.DataFrame({"image_id": ids, "confidence": np.round(conf, 6),
                         "area": np.round((probs >= t).mean(axis=(1, 2)) if len(ids) else np.zeros(0), 6),
                         "kept": kept, "models": ";".join(models), "cycle": cycle, "source": f"gen{cycle - 1}/{SEGMENTER}"})
    write_table(out_dir / MASK_PSEUDO, rows)
    save_npz(out_dir / MASK_PSEUDO_PROBS, image_id=np.array(ids, str), probs=mp.to_uint8(probs))
    info = {"pixel_threshold": float(t), "confidence": sc.confidence,
            "confidence_threshold": float(c) if np.isfinite(c) else None, "target_dice": sc.target_dice,
            "support": support, "weak_evidence": support < sc.min_oof_support, "oof_images": int(len(oof_dice)),
            "oof_dice": float(oof_dice.mean()) if len(oof_dice) else None,
            "oof_dice_kept": float(oof_dice[oof_conf >= c].mean()) if support else None,
            "candidates": len(ids), "kept": int(kept.sum()), "kept_per_class": {"mask": int(kept.sum())},
            "threshold_oof_folds": oof_folds, "models": models, "fallback": fallback}
    info.update(truth_dice(task, ids, probs, kept, t))
    if info["weak_evidence"] or fallback is not None:
        log.warning("segmenter pseudo masks from %s: %s", "+".join(models),
                    f"no confidence reaches dice {sc.target_dice} on OOF; top {fallback} kept (fallback)"
                    if fallback is not None else f"threshold read from {support} OOF images (weak evidence)")
    write_json(out_dir / MASK_PSEUDO_INFO, info)
    return info


def truth_dice(task: SegmenterTask, ids: list[str], probs: np.ndarray, kept: np.ndarray, t: float) -> dict:
    """Mean dice of the kept pseudo masks against the pool's hidden truth (measures, never selects)."""
    truth = task.ctx.truth
    if truth is None or "mask_labeled" not in truth.items:
        return {}
    known = set(truth.items.loc[truth.items["mask_labeled"], "image_id"])
    chosen = [n for n, i in enumerate(ids) if kept[n] and i in known]
    if not chosen:
        return {"precision": None, "truth_images": 0}
    masks = np.stack([task.ctx.mask_loader()(ids[n]) for n in chosen])
    return {"precision": float(dice_per_image(probs[chosen] >= t, masks).mean()), "truth_images": len(chosen)}


def student_mask_totals(fold_infos: list[dict]) -> dict:
    """What the students trained on, summed over their folds: kept pseudo masks and their dice
    against hidden truth (weighted by each fold's count), and the folds with weak evidence."""
    kept = sum(i["kept"] for i in fold_infos)
    pairs = [(i["precision"], i["truth_images"]) for i in fold_infos if i.get("precision") is not None]
    weighted = sum(p * n for p, n in pairs) / sum(n for _, n in pairs) if pairs else None
    return {"kept_per_class": {"mask": kept}, "total": kept, "precision": weighted,
            "starving": {"mask": [f"fold {f}: weak evidence" for f, i in enumerate(fold_infos) if i["weak_evidence"]]}
            if any(i["weak_evidence"] for i in fold_infos) else {}}
