"""Segmentation as a task kind: k fold smp models, mask probabilities, pseudo masks.

The same cycle as the classifier's and the detector's, through the one cross-fit loop: generation
0 trains on the mask-labeled images only; a student fold k trains on the labeled images of the
other folds plus the pseudo masks teacher fold k (its two flip views, flipped back and averaged)
made on the pool, with the pixel threshold and the image-confidence threshold read on the OTHER
folds' OOF predictions (``tasks.base.assert_fold_lineage`` checks it when the plan is made).
Probabilities are stored as 8-bit (``mask_pseudo.to_uint8``) and thresholded when the student
reads them. Masks are read through the mask cache (nearest-neighbour resized at the run's size).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ...augment.transforms import segmentation_transform
from ...datasets.atomic import read_json, read_table, write_json
from ...datasets.config import config_to_dict
from ...datasets.errors import ConfigError
from ...datasets.seg_data import SegmentationDataset
from ...loops.checkpoint import preprocess_from_meta, save_checkpoint
from ...loops.crossfit import FoldPlan
from ...loops.seg_metrics import segmentation_metrics
from ...loops.segment import fit_segmenter, predict_mask_views
from ...loops.stages import file_digest
from .. import mask_pseudo as mp
from ..config import ladder_value, matched_epochs
from ..layout import (CHECKPOINT, HISTORY, MASK_PSEUDO, MASK_PSEUDO_INFO, MASK_PSEUDO_PROBS, OOF_MASKS, POOL_FOLD_MASKS,
                      POOL_MASKS, SEGMENTER, pseudo_fold_dir)
from ..pseudo import labeled_share_weights
from ..seg_models import SEG_CLASS_NAMES, create_segmenter, load_segmenter
from .base import Task, assert_fold_lineage, fold_seed, seed_everything
from .segmenter_select import load_npz, save_npz, select_masks

log = logging.getLogger("cxr.cycle")


@dataclass(frozen=True)
class MaskTrainingSet:
    """One fold's images: ground-truth masks first, then pseudo masks (stored uint8 probabilities)."""

    image_ids: list[str]
    pseudo: dict[str, np.ndarray]
    """image_id -> stored uint8 pseudo mask (images absent here read their ground truth)."""
    pixel_threshold: float
    weights: np.ndarray
    generation: int = 0


class SegmenterTask(Task):
    name = SEGMENTER

    # ------------------------------------------------------------------ which images
    def enabled(self) -> bool:
        items = self.table.items
        return "mask_labeled" in items and bool(items.loc[items["role"] == "labeled", "mask_labeled"].any())

    def mask_labeled(self) -> set[str]:
        items = self.table.items
        return set(items.loc[items["mask_labeled"], "image_id"]) if "mask_labeled" in items else set()

    def labeled_ids(self) -> list[str]:
        masked = self.mask_labeled()
        return [i for i in self.ctx.labeled_ids if i in masked]

    def pool_ids(self) -> list[str]:
        """Unlabeled + test images, and labeled images nobody drew a mask on (the mask pool)."""
        items = self.ctx.table.items
        return self.images_without(items.get("mask_labeled", pd.Series(False, index=items.index)))

    def candidate_ids(self) -> list[str]:
        """The pool images pseudo masks may be made for (never the test part)."""
        test = set(self.ctx.ids("test"))
        return [i for i in self.pool_ids() if i not in test]

    def model_name(self, gen: int) -> str:
        return ladder_value(self.cfg.segmenter.ladder, gen)

    def student_steps(self) -> float:
        return self.cfg.segmenter.student_steps

    def finetune_section(self):
        return self.cfg.segmenter

    @property
    def views(self) -> list[str]:
        return ["orig", "hflip"] if self.cfg.segmenter.hflip and self.cfg.augment.tta_hflip else ["orig"]

    def model_tags(self, fold: int) -> list[str]:
        return [f"f{fold}/{v}" for v in self.views]

    # ------------------------------------------------------------------ plans
    def payload(self, gen: int) -> dict:
        """What makes generation ``gen``'s mask models: its own rung of every ladder and the training
        settings, not the whole section -- so a change to a student's recipe, to how pseudo masks
        are chosen (which reaches training through the training set's fingerprint) or to the
        cascade never retrains the teacher or the references."""
        cfg, sc = self.cfg, self.cfg.segmenter
        return {"model": self.model_name(gen), "drop_rate": ladder_value(sc.drop_rate, gen),
                "drop_path_rate": ladder_value(sc.drop_path_rate, gen),
                "randaugment": [ladder_value(sc.randaugment_n, gen), ladder_value(sc.randaugment_m, gen)],
                "decoder_channels": list(sc.decoder_channels), "hflip": sc.hflip, "dice_weight": sc.dice_weight,
                "train": config_to_dict(sc.train), "pre": config_to_dict(cfg.preprocess),
                "tta": cfg.augment.tta_hflip, "seed": cfg.run.seed, "gen": gen,
                **({"cutmix": ladder_value(sc.cutmix, gen)} if ladder_value(sc.cutmix, gen) else {})}

    def fold_plans(self, gen: int, pseudo_dir: Path | None, teacher: Path | None, extra_ids: Sequence[str] = (),
                   *, steps_factor: float | None = None, patience: int = 0) -> list[FoldPlan]:
        """Fold k: ground-truth masks of the other folds' labeled images (+ extra ids with truth) +
        the pseudo masks chosen for fold k (teacher fold k alone; see ClassifierTask.fold_plans)."""
        sc, folds, plans, masks = self.cfg.segmenter, self.ctx.folds, [], self.ctx.mask_loader()
        for fold in range(self.cfg.folds.k):
            train_ids = [i for i in self.labeled_ids() if folds[i] != fold] + list(extra_ids)
            val_ids = [i for i in self.labeled_ids() if folds[i] == fold]
            pseudo, threshold, digest = {}, 0.5, None
            if pseudo_dir is not None:
                where = pseudo_fold_dir(pseudo_dir, fold)
                rows, info = read_table(where / MASK_PSEUDO, dtype={"models": str}), read_json(where / MASK_PSEUDO_INFO)
                kept = rows[rows["kept"].astype(bool)]
                assert_fold_lineage(fold, kept["models"], info["threshold_oof_folds"], where=where)
                stored = load_npz(where / MASK_PSEUDO_PROBS)
                index = {str(i): n for n, i in enumerate(stored["image_id"])}
                pseudo = {str(i): stored["probs"][index[str(i)]] for i in kept["image_id"]}
                threshold, digest = info["pixel_threshold"], file_digest(where)
            ids = train_ids + list(pseudo)
            weights = np.r_[np.ones(len(train_ids)), np.full(len(pseudo), sc.pseudo_weight)].astype(np.float32)
            if sc.empty_weight != 1.0:
                empty = ([not masks(i).any() for i in train_ids]
                         + [not (m >= threshold * 255).any() for m in pseudo.values()])
                weights = np.where(empty, weights * sc.empty_weight, weights).astype(np.float32)
            epochs = matched_epochs(sc.train.epochs, len(train_ids) - len(extra_ids), len(ids),
                                    self.steps_factor(gen, steps_factor))
            plans.append(FoldPlan(fold, MaskTrainingSet(ids, pseudo, threshold, weights, gen), tuple(ids),
                                  tuple(val_ids), epochs, {"ids": ids, "pseudo": digest, "weights": weights.tolist(),
                                                           "pseudo_mode": sc.pseudo_mode if pseudo else None,
                                                           "labeled_share": sc.labeled_share if pseudo else None,
                                                           **({"pixel_confidence": sc.pixel_confidence}
                                                              if pseudo and sc.pixel_confidence else {}),
                                                           **self.finetune_payload(gen)},
                                  patience=patience))
        return plans

    # ------------------------------------------------------------------ one fold
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict:
        """Train one fold segmenter and write its checkpoint (with its preprocessing) and history."""
        cfg, sc, pp = self.cfg, self.cfg.segmenter, self.cfg.preprocess
        ts: MaskTrainingSet = plan.train
        gen, name = ts.generation, self.model_name(ts.generation)
        drop, drop_path = ladder_value(sc.drop_rate, gen), ladder_value(sc.drop_path_rate, gen)
        n, m = ladder_value(sc.randaugment_n, gen), ladder_value(sc.randaugment_m, gen)
        seed = fold_seed(cfg.run.seed, gen, plan.fold)
        seed_everything(seed)
        try:
            model = create_segmenter(name, drop_rate=drop, drop_path_rate=drop_path,
                                     decoder_channels=sc.decoder_channels)
        except ValueError as err:
            raise ConfigError(f"segmenter.ladder: {err}") from None
        masks, load = self.ctx.mask_loader(), self.ctx.loader()

        def target_of(index: int, ids=ts.image_ids) -> np.ndarray:
            image_id = ids[index]
            if image_id in ts.pseudo:
                return mp.pseudo_target(ts.pseudo[image_id], pixel_threshold=ts.pixel_threshold, mode=sc.pseudo_mode,
                                        pixel_confidence=sc.pixel_confidence)
            return masks(image_id).astype(np.float32)

        val_ids = list(plan.val_ids)
        transform = segmentation_transform(pp.size, n, m, hflip=sc.hflip)
        val_ds = SegmentationDataset(load, val_ids, lambda i: masks(val_ids[i]).astype(np.float32), None, None,
                                     pp.mean, pp.std)
        truth_rows = [n for n, i in enumerate(ts.image_ids) if i not in ts.pseudo]
        phases = self.training_phases(gen, plan.epochs, len(ts.image_ids), len(truth_rows), sc.train.lr)
        results = []
        for epochs, lr, labeled_only in phases:
            rows, label = (truth_rows, " fine-tune") if labeled_only else (list(range(len(ts.image_ids))), "")
            ids = [ts.image_ids[r] for r in rows]
            train_ds = SegmentationDataset(load, ids, lambda i, ids=ids: target_of(i, ids), ts.weights[rows],
                                           transform, pp.mean, pp.std)
            train_cfg = replace(sc.train, epochs=epochs, lr=lr, patience=plan.patience or sc.train.patience)
            results.append(fit_segmenter(model, train_ds, val_ds if val_ids else None, train_cfg,
                                         device=self.ctx.device, log=log.info, seed=seed + len(results),
                                         dice_weight=sc.dice_weight, name=f"{SEGMENTER} gen {gen} fold {plan.fold}{label}",
                                         sampler_weights=labeled_share_weights([i in ts.pseudo for i in ids],
                                                                               share=sc.labeled_share),
                                         cutmix=ladder_value(sc.cutmix, gen)))
        result = results[-1]
        history = [dict(row, phase=p) for p, r in enumerate(results) for row in r.history]
        meta = {"model_name": name, "num_classes": 1, "class_names": list(SEG_CLASS_NAMES), "drop_rate": drop,
                "drop_path_rate": drop_path, "decoder_channels": list(sc.decoder_channels),
                "preprocess": config_to_dict(pp), "activation": "sigmoid",
                "generation": gen, "fold": plan.fold, "randaugment": [n, m], "epochs": plan.epochs,
                "cutmix": ladder_value(sc.cutmix, gen), "finetune_epochs": sum(e for e, _, only in phases if only),
                "config": config_to_dict(cfg)}
        save_checkpoint(out_dir / CHECKPOINT, model, meta)
        epochs_run = sum(r.epochs_run for r in results)
        write_json(out_dir / HISTORY, {"history": history, "best_metric": result.best_metric, "epochs_run": epochs_run})
        return {"best_metric": result.best_metric, "epochs_run": epochs_run, "model": name,
                "train_images": len(set(ts.image_ids)), "pseudo_masks": len(ts.pseudo)}

    # ------------------------------------------------------------------ prediction
    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame:
        """Per-view mask probabilities (uint8, flipped view flipped back) of one fold model, read
        through the cache of the checkpoint's own preprocessing."""
        ids = list(image_ids)
        model, meta = load_segmenter(fold_dir / CHECKPOINT, self.ctx.device)
        pp = meta["preprocess"]
        ds = SegmentationDataset(self.ctx.loader(preprocess_from_meta(meta)), ids, None, None, None, pp["mean"], pp["std"])
        views = predict_mask_views(model, ds, device=self.ctx.device, batch_size=self.cfg.segmenter.train.batch_size,
                                   tta_hflip=len(self.views) > 1)
        stored = mp.to_uint8(views)
        return pd.DataFrame({"image_id": ids, "views": [stored[:, n] for n in range(len(ids))]})

    def write_predictions(self, oof: pd.DataFrame, every: pd.DataFrame, out_dir: Path) -> dict:
        """oof_masks.npz (ids, folds, views), pool_fold_masks.npz (every fold x view on every pool
        image) and pool_masks.npz (their mean: the ensemble). Raw probabilities, 8-bit."""
        save_npz(out_dir / OOF_MASKS, image_id=oof["image_id"].to_numpy(str), fold=oof["fold"].to_numpy(int),
                 views=np.stack(oof["views"].to_list(), axis=1) if len(oof) else np.zeros((len(self.views), 0, 1, 1), np.uint8))
        ids = sorted(set(every["image_id"]))
        k = self.cfg.folds.k
        if ids:
            by = {(f, i): v for f, i, v in zip(every["fold"], every["image_id"], every["views"])}
            per_fold = np.stack([np.stack([by[(f, i)] for i in ids], axis=1) for f in range(k)])  # F, V, N, H, W
            save_npz(out_dir / POOL_FOLD_MASKS, image_id=np.array(ids, str), views=per_fold)
            mean = mp.from_uint8(per_fold).mean(axis=(0, 1))
            save_npz(out_dir / POOL_MASKS, image_id=np.array(ids, str), probs=mp.to_uint8(mean))
        return {"oof_images": int(len(oof)), "pool_images": len(ids), "views": self.views}

    # ------------------------------------------------------------------ pseudo masks
    def oof_arrays(self, pred_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """(ids, folds, per-view probabilities (V, N, H, W) float, truth (N, H, W) bool) of the OOF predictions."""
        oof = load_npz(pred_dir / OOF_MASKS)
        ids = [str(i) for i in oof["image_id"]]
        truth = np.stack([self.ctx.mask_loader()(i) for i in ids]).astype(bool) if ids else np.zeros((0, 1, 1), bool)
        return ids, oof["fold"], mp.from_uint8(oof["views"]), truth

    def select(self, teachers: dict[str, Path], out_dir: Path, cycle: int) -> dict:
        """The ensemble's pseudo masks (report, exports) and per fold k the ones student fold k
        trains on: teacher fold k's views, thresholds from the other folds' OOF."""
        return select_masks(self, teachers[SEGMENTER], out_dir, cycle)

    # ------------------------------------------------------------------ scores
    def score(self, pred_dir: Path) -> dict:
        """Dice and IoU at the fixed scoring threshold (segmenter.pixel_threshold, else 0.5): OOF,
        held-out test, and the pool's hidden truth when the run has masks for it."""
        t = self.cfg.segmenter.pixel_threshold or 0.5
        ids, _, views, truth = self.oof_arrays(pred_dir)
        out = {"oof": segmentation_metrics(views.mean(axis=0), truth, threshold=t) if ids else None}
        pool = load_npz(pred_dir / POOL_MASKS) if (pred_dir / POOL_MASKS).exists() else None
        masked = self.mask_labeled()
        for key, table, wanted in (("test", self.table, [i for i in self.ctx.ids("test") if i in masked]),
                                   ("unlabeled_truth", self.ctx.truth, None)):
            if table is None or pool is None or "mask_labeled" not in table.items:
                continue
            if wanted is None:
                unlabeled = set(self.ctx.ids("unlabeled"))
                wanted = [i for i in table.items.loc[table.items["mask_labeled"], "image_id"] if i in unlabeled]
            index = {str(i): n for n, i in enumerate(pool["image_id"])}
            wanted = [i for i in wanted if i in index]
            if wanted:
                probs = mp.from_uint8(pool["probs"][[index[i] for i in wanted]])
                truth = np.stack([self.ctx.mask_loader()(i) for i in wanted])
                out[key] = segmentation_metrics(probs, truth, threshold=t)
        return out

