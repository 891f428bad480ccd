"""The box detector as a task kind: k fold detectors, OOF boxes, WBF-fused pool boxes, pseudo boxes.

Only images whose boxes are ground truth (``box_labeled``) train and score a detector; the pool it
predicts is the unlabeled and test roles plus labeled images nobody drew boxes on
(``box_annotated = 0``). Detectors are built by ``teacher_student.detectors`` (ultralytics YOLO or
effdet) behind one interface.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ...datasets.adapters import training_boxes
from ...datasets.atomic import read_json, read_table, write_json, write_table
from ...datasets.boxes import BOX_COLUMNS
from ...datasets.config import config_to_dict, fingerprint
from ...datasets.table import ItemTable
from ...loops.checkpoint import preprocess_from_meta
from ...loops.crossfit import FoldPlan
from ...loops.det_metrics import mean_average_precision, true_positive_mask
from .. import pseudo
from ..config import detector_preprocess, ladder_value, matched_epochs
from ..detectors import create_detector, load_detector
from ..evaluation import box_truth_precision, box_truth_precision_per_class
from ..fusion import fuse_boxes
from ..gating import p_abnormal_series
from ..layout import (BOX_IMAGES, BOX_OOF_MATCHED, BOX_PSEUDO, BOX_PSEUDO_INFO, CLASSIFIER, DETECTOR,
                      DETECTOR_CHECKPOINT, HISTORY, LABELED_FOLDS, OOF_BOXES, POOL_FUSED, POOL_RAW, pseudo_fold_dir)
from .base import Task, assert_fold_lineage, fold_seed, of_fold, student_totals, warn_starving
from .classifier import load_predictions

BOX_OUT = ["image_id", "class_id", *BOX_COLUMNS, "score"]
log = logging.getLogger("cxr.cycle")


@dataclass(frozen=True)
class BoxTrainingSet:
    """One fold detector's training boxes (an image of the plan without rows is a negative) and the
    ground-truth boxes of its validation images (never trained on: they only score epochs)."""

    boxes: pd.DataFrame
    generation: int
    val_boxes: pd.DataFrame | None = None
    truth_ids: tuple[str, ...] = ()
    """The training images whose boxes are ground truth (a fine-tuning phase trains on them alone)."""


class DetectorTask(Task):
    name = DETECTOR

    # ------------------------------------------------------------------ which images
    def enabled(self) -> bool:
        return bool(self.cfg.detector.enabled and self.table.box_classes and self.labeled_ids())

    def labeled_ids(self) -> list[str]:
        """Labeled images whose boxes are ground truth: the ones detectors train on and score."""
        boxed = set(self.table.items.loc[self.table.items["box_labeled"], "image_id"])
        return [i for i in self.ctx.folds.index if i in boxed]

    def pool_ids(self) -> list[str]:
        """Unlabeled + test images, and labeled images nobody drew boxes on."""
        return self.images_without(self.ctx.table.items["box_labeled"])

    def model_name(self, gen: int) -> str:
        return ladder_value(self.cfg.detector.ladder, gen)

    @property
    def load(self):
        """Images as the detectors read them: cached at the detector's input size."""
        return self.ctx.loader(detector_preprocess(self.cfg))

    def student_steps(self) -> float:
        return self.cfg.detector.student_steps

    def finetune_section(self):
        return self.cfg.detector

    @property
    def flip_tta(self) -> bool:
        return self.cfg.augment.tta_hflip and self.cfg.detector.hflip

    def view_names(self, fold: int) -> list[str]:
        tag = f"f{fold}"
        return [f"{tag}/orig"] + ([f"{tag}/hflip"] if self.flip_tta else [])

    # ------------------------------------------------------------------ plans
    def payload(self, gen: int) -> dict:
        """What makes generation ``gen``'s detectors and their predictions: its own rung of every
        ladder and the training and prediction settings, not the pseudo-box selection ones."""
        cfg, dc = self.cfg, self.cfg.detector
        keys = ("kind", "img_size", "batch_size", "lr", "hflip", "conf_floor", "iou_thr", "skip_box_thr", "conf_type")
        return {"model": self.model_name(gen), **{k: getattr(dc, k) for k in keys},
                "randaugment": [ladder_value(dc.randaugment_n, gen), ladder_value(dc.randaugment_m, gen)],
                "tta_hflip": cfg.augment.tta_hflip, "pre": config_to_dict(detector_preprocess(cfg)),
                "seed": cfg.run.seed, "gen": gen}

    def fold_plans(self, gen: int, pseudo_dir: Path | None, teacher: Path | None, extra_ids: Sequence[str] = (),
                   *, steps_factor: float | None = None, patience: int = 0) -> list[FoldPlan]:
        """Fold k: ground-truth boxes of the other folds' labeled images + the pseudo boxes chosen
        for fold k (teacher fold k alone; see ClassifierTask.fold_plans for why)."""
        gt = training_boxes(self.table)
        dc, folds, plans = self.cfg.detector, self.ctx.folds, []
        for fold in range(self.cfg.folds.k):
            train_ids = [i for i in self.labeled_ids() if folds[i] != fold] + list(extra_ids)
            val_ids = [i for i in self.labeled_ids() if folds[i] == fold]
            p_boxes = p_images = None
            if pseudo_dir is not None:
                where = pseudo_fold_dir(pseudo_dir, fold)
                p_boxes, p_images = read_table(where / BOX_PSEUDO), read_table(where / BOX_IMAGES)
                assert_fold_lineage(fold, p_boxes["models"], read_json(where / BOX_PSEUDO_INFO)["threshold_oof_folds"],
                                    where=where)
            ids, boxes = training_set(gt, train_ids, p_boxes, p_images)
            epochs = matched_epochs(dc.epochs, len(train_ids) - len(extra_ids), len(ids),
                                    self.steps_factor(gen, steps_factor))
            val_boxes = gt[gt["image_id"].isin(set(val_ids))]
            payload = {"ids": ids, "boxes": fingerprint(boxes.round(6).to_dict("list"))}
            if patience or dc.kind == "effdet":  # validation then chooses the weights (YOLO scores only its last epoch)
                payload["val_boxes"] = fingerprint(val_boxes.round(6).to_dict("list"))
            payload.update(self.finetune_payload(gen))
            plans.append(FoldPlan(fold, BoxTrainingSet(boxes, gen, val_boxes, tuple(train_ids)), tuple(ids),
                                  tuple(val_ids), epochs, payload, patience=patience))
        return plans

    # ------------------------------------------------------------------ one fold
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict:
        """Train one fold detector of a generation and write its checkpoint."""
        dc = self.cfg.detector
        gen, boxes = plan.train.generation, plan.train.boxes
        if plan.train.val_boxes is not None:  # the export labels the validation images too (disjoint from training)
            boxes = pd.concat([boxes, plan.train.val_boxes], ignore_index=True)
        name = self.model_name(gen)
        detector = create_detector(dc.kind, name, len(self.table.box_classes), list(self.table.box_classes), dc.img_size,
                                   preprocess=detector_preprocess(self.cfg))
        run_name = self.run_name(out_dir, gen, plan.fold)
        logdir = self.tensorboard_dir(out_dir, plan.fold)
        scalars = None
        if logdir is not None:
            from ...loops.tensorboard import ScalarLog

            scalars = ScalarLog(logdir)

        def on_epoch(record) -> None:
            log.info(f"{run_name}: {format_epoch(record)}")
            if scalars is not None and isinstance(record, dict):
                scalars.epoch(record, int(record.get("epoch", 0)))

        truth = list(plan.train.truth_ids)
        phases = self.training_phases(gen, plan.epochs, len(plan.train_ids), len(truth), dc.lr)
        records, results = [], []
        try:
            for epochs, lr, labeled_only in phases:
                ids, work = (truth, "work_finetune") if labeled_only else (list(plan.train_ids), "work")
                if labeled_only:
                    log.info(f"{run_name}: fine-tune on the {len(ids)} ground-truth images, {epochs} epochs at lr {lr:.3g}")
                results.append(detector.fit(ids, list(plan.val_ids), boxes, self.load, out_dir / work, epochs=epochs,
                                            batch_size=dc.batch_size, lr=lr, img_size=dc.img_size,
                                            randaugment_n=ladder_value(dc.randaugment_n, gen),
                                            randaugment_m=ladder_value(dc.randaugment_m, gen), hflip=dc.hflip,
                                            device=dc.devices or str(self.ctx.device),
                                            seed=fold_seed(self.cfg.run.seed, gen, plan.fold) + len(results),
                                            log=on_epoch, run_name=run_name + (" fine-tune" if labeled_only else ""),
                                            patience=plan.patience, warm_start=labeled_only))
                kept = [r for r in detector.history if isinstance(r, dict) and not r.get("final")]
                records += [dict(r, phase=len(results) - 1, epoch=len(records) + n) for n, r in enumerate(kept, 1)]
        finally:
            if scalars is not None:
                scalars.close()
        detector.save(out_dir / DETECTOR_CHECKPOINT)
        write_json(out_dir / HISTORY, {"history": records, "curve": epoch_curve(records)})
        return {"model": name, "epochs": plan.epochs, "finetune_epochs": sum(e for e, _, only in phases if only),
                "train_images": len(set(plan.train_ids)),
                "train_boxes": int(len(plan.train.boxes)),
                "fit": results[-1] if isinstance(results[-1], dict) else None}

    # ------------------------------------------------------------------ prediction
    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame:
        """Boxes of one fold detector for every TTA view, tagged with the model ``f<fold>/<view>``,
        read through the cache of the checkpoint's own preprocessing (its normalisation too: effdet
        reads mean/std from the checkpoint), never the run's current settings."""
        ids = list(image_ids)
        if not ids:
            return pd.DataFrame(columns=[*BOX_OUT, "model"])
        path = fold_dir / DETECTOR_CHECKPOINT
        detector = load_detector(path, str(self.ctx.device))
        load = self.ctx.loader(preprocess_from_meta({"preprocess": detector.preprocess}, where=path))
        raw = detector.predict(ids, load, tta_hflip=self.flip_tta, conf_floor=self.cfg.detector.conf_floor,
                               device=str(self.ctx.device), batch_size=self.cfg.detector.batch_size)
        return raw.assign(model=[f"f{fold}/{v}" for v in raw["view"]])[[*BOX_OUT, "model"]]

    def write_predictions(self, oof: pd.DataFrame, pool: pd.DataFrame, out_dir: Path) -> dict:
        """oof_boxes.csv (each fold's OOF views fused), pool_raw.csv (every fold x view) and
        pool_fused.csv (WBF over all of them)."""
        folds = range(self.cfg.folds.k)
        oof_parts = [self.fuse(oof[oof["fold"] == k].drop(columns="fold"), self.view_names(k), 0).assign(fold=k)
                     for k in folds]
        oof_fused = pd.concat(oof_parts, ignore_index=True)
        write_table(out_dir / OOF_BOXES, oof_fused)
        raw = pool.drop(columns="fold")
        write_table(out_dir / POOL_RAW, raw)
        models = [name for k in folds for name in self.view_names(k)]
        fused = self.fuse(raw, models, self.cfg.detector.workers)
        write_table(out_dir / POOL_FUSED, fused)
        return {"oof_boxes": int(len(oof_fused)), "pool_raw": int(len(raw)), "pool_fused": int(len(fused)),
                "models": models}

    def fuse(self, raw: pd.DataFrame, models: list[str], workers: int) -> pd.DataFrame:
        dc = self.cfg.detector
        return fuse_boxes(raw, iou_thr=dc.iou_thr, skip_box_thr=dc.skip_box_thr, conf_type=dc.conf_type, models=models,
                          workers=workers)

    # ------------------------------------------------------------------ pseudo boxes
    def select(self, teachers: dict[str, Path], out_dir: Path, cycle: int) -> dict:
        """The ensemble's pseudo boxes (for the report and the exports) and, per fold k, the ones
        student fold k trains on: teacher fold k's views fused, thresholds from the other folds'
        OOF boxes, negatives decided by classifier fold k."""
        dc, pred_dir = self.cfg.detector, teachers[DETECTOR]
        test = set(self.ctx.ids("test"))
        pool_ids = [i for i in self.pool_ids() if i not in test]
        matched = mark_true_positives(read_table(pred_dir / OOF_BOXES), training_boxes(self.table), iou_thr=dc.metric_iou)
        write_table(out_dir / BOX_OOF_MATCHED, matched)
        fused = read_table(pred_dir / POOL_FUSED)
        k = self.cfg.folds.k
        info = self.select_set(fused[fused["image_id"].isin(set(pool_ids))], matched, pool_ids,
                               p_abnormal(self.table, teachers[CLASSIFIER]), out_dir, cycle=cycle,
                               models=[m for f in range(k) for m in self.view_names(f)], oof_folds=list(range(k)))
        raw = read_table(pred_dir / POOL_RAW)
        raw = raw[raw["image_id"].isin(set(pool_ids))]
        info["folds"] = {}
        for fold in range(k):
            views = self.view_names(fold)
            fused_k = self.fuse(raw[raw["model"].isin(views)], views, dc.workers)
            others = [f for f in range(k) if f != fold]
            info["folds"][str(fold)] = self.select_set(
                fused_k, matched[matched["fold"].isin(others)], pool_ids,
                p_abnormal(self.table, teachers[CLASSIFIER], fold), pseudo_fold_dir(out_dir, fold), cycle=cycle,
                models=views, oof_folds=others)
        info["students"] = student_totals(list(info["folds"].values()), count_key="per_class")
        return info

    def select_set(self, fused: pd.DataFrame, matched: pd.DataFrame, pool_ids: list[str], p_ab: pd.Series,
                   out_dir: Path, *, cycle: int, models: list[str], oof_folds: list[int]) -> dict:
        """One selection of pseudo boxes: per-class thresholds from ``matched`` OOF boxes at the
        target precision, starving classes flagged and given the fallback, then kept boxes /
        negatives / uncertain images."""
        dc, classes = self.cfg.detector, self.table.box_classes
        n = len(classes)
        thresholds = np.maximum(pseudo.box_thresholds(matched, num_classes=n, target_precision=dc.target_precision),
                                dc.threshold_floor)
        kept = fused[fused["score"].to_numpy() >= thresholds[fused["class_id"].to_numpy(int)]] if len(fused) else fused
        gt = training_boxes(self.table)
        present = np.unique(gt.loc[gt["image_id"].isin(set(self.labeled_ids())), "class_id"].to_numpy(int))
        support = pseudo.box_threshold_support(matched, thresholds, num_classes=n)
        starving = pseudo.box_starving_classes(support, kept, num_classes=n, min_support=dc.min_oof_support,
                                               present=present)
        used = pseudo.box_fallback_thresholds(fused, kept, thresholds, list(starving), fallback=dc.fallback,
                                              k=dc.fallback_k)
        boxes, images = pseudo.select_pseudo_boxes(fused, pool_ids, p_ab, thresholds=used,
                                                   negative_max_p_abnormal=dc.negative_max_p_abnormal,
                                                   uncertain_floor=dc.uncertain_floor)
        boxes = boxes.assign(cycle=cycle, source=f"gen{cycle - 1}/{DETECTOR}")  # models column: the folds x views
        write_table(out_dir / BOX_PSEUDO, boxes)
        write_table(out_dir / BOX_IMAGES, images)
        per_class = boxes.groupby("class_id").size() if len(boxes) else pd.Series(dtype=int)
        info = {"thresholds": dict(zip(classes, [None if np.isinf(t) else float(t) for t in thresholds])),
                "thresholds_used": dict(zip(classes, [None if np.isinf(t) else float(t) for t in used])),
                "boxes": int(len(boxes)), "images": {s: int(v) for s, v in images["status"].value_counts().items()},
                "per_class": {classes[int(c)]: int(v) for c, v in per_class.items()},
                "support": {classes[c]: int(support[c]) for c in range(n)},
                "oof_boxes": {classes[c]: int((matched["class_id"] == c).sum()) for c in range(n)},
                "threshold_oof_folds": oof_folds,
                "models": models, "starving": {classes[c]: why for c, why in starving.items()},
                "fallback": {classes[c]: int(per_class.get(c, 0)) for c in starving} if dc.fallback == "top_k" else {},
                "fallback_mode": dc.fallback}
        if self.ctx.truth is not None:
            reread = read_table(out_dir / BOX_PSEUDO)  # as the student will read them (CSV round trip)
            info.update(box_truth_precision(reread, read_table(out_dir / BOX_IMAGES), self.ctx.truth,
                                            iou_thr=dc.metric_iou))
            info["precision_per_class"] = box_truth_precision_per_class(reread, self.ctx.truth, classes,
                                                                        iou_thr=dc.metric_iou)
        warn_starving(DETECTOR, models, info, kept=info["per_class"])
        write_json(out_dir / BOX_PSEUDO_INFO, info)
        return info

    # ------------------------------------------------------------------ scores
    def score(self, pred_dir: Path) -> dict:
        iou, table = self.cfg.detector.metric_iou, self.table
        gt = training_boxes(table)
        oof, pool = read_table(pred_dir / OOF_BOXES), read_table(pred_dir / POOL_FUSED)
        boxed = self.ctx.box_labeled
        test_ids = [i for i in self.ctx.scored_test_ids() if i in boxed]
        out = {"oof": evaluate_boxes(table, gt, oof, self.labeled_ids(), iou),
               "test": evaluate_boxes(table, gt, pool, test_ids, iou)}
        truth = self.ctx.truth
        if truth is not None:
            truth_ids = truth.items.loc[truth.items["box_labeled"], "image_id"].tolist()
            unlabeled = set(self.ctx.ids("unlabeled"))
            out["unlabeled_truth"] = evaluate_boxes(table, training_boxes(truth), pool,
                                                    [i for i in truth_ids if i in unlabeled], iou)
        return out


def training_set(gt: pd.DataFrame, train_ids: list[str], pseudo_boxes: pd.DataFrame | None,
                 pseudo_images: pd.DataFrame | None) -> tuple[list[str], pd.DataFrame]:
    """Images and boxes of one fold: ground truth of its labeled images + the selected pseudo boxes
    (images with status "boxes" or "negative"; "uncertain" ones are left out)."""
    ids = list(train_ids)
    boxes = [gt[gt["image_id"].isin(set(train_ids))][["image_id", "class_id", *BOX_COLUMNS]]]
    if pseudo_images is not None and len(pseudo_images):
        chosen = pseudo_images[pseudo_images["status"].isin(["boxes", "negative"])]["image_id"].tolist()
        ids += chosen
        boxes.append(pseudo_boxes[pseudo_boxes["image_id"].isin(set(chosen))][["image_id", "class_id", *BOX_COLUMNS]])
    dtypes = {"class_id": "int64", **{c: "float32" for c in BOX_COLUMNS}}  # an empty pseudo table reads as text
    return ids, pd.concat([b.astype(dtypes) for b in boxes], ignore_index=True)


def p_abnormal(table: ItemTable, cls_pred: Path, fold: int | None = None) -> pd.Series:
    """Classifier P(abnormal) for every image: OOF for labeled ones and the fold ensemble elsewhere,
    or, with ``fold``, classifier fold ``fold``'s own predictions of every image."""
    preds = load_predictions(cls_pred)
    if fold is None:
        frames = [preds["oof"]] + ([preds["pool"]] if "pool" in preds else [])
    else:
        frames = [of_fold(read_table(cls_pred / LABELED_FOLDS), fold)]
        frames += [of_fold(preds["pool_folds"], fold)] if "pool_folds" in preds else []
    return p_abnormal_series(pd.concat(frames, ignore_index=True), table.normal_class)


def mark_true_positives(pred: pd.DataFrame, gt: pd.DataFrame, *, iou_thr: float) -> pd.DataFrame:
    """Predictions with a ``true_positive`` column (the mAP metric's matching rule)."""
    return pred.assign(true_positive=true_positive_mask(pred, gt, iou_thr=iou_thr))


def evaluate_boxes(table: ItemTable, gt: pd.DataFrame, pred: pd.DataFrame, image_ids: list[str],
                   iou_thr: float) -> dict | None:
    """mAP of predictions on the given box-labeled images (None when there are none)."""
    if not image_ids:
        return None
    return mean_average_precision(pred, gt, num_classes=len(table.box_classes), iou_thr=iou_thr,
                                  class_names=list(table.box_classes), image_ids=image_ids)


def epoch_curve(records: list[dict]) -> list[dict]:
    """Per epoch the report's curve values from a detector's records, whichever library made them:
    ``train_loss`` / ``val_loss`` (``train/loss``, or the sum of the ``train/*_loss`` parts, as
    ultralytics logs box, class and DFL losses) and ``metric`` (ultralytics' validation mAP@0.5;
    effdet validates by loss only)."""
    def total(record: dict, split: str) -> float | None:
        if f"{split}/loss" in record:
            return float(record[f"{split}/loss"])
        parts = [float(v) for k, v in record.items() if k.startswith(f"{split}/") and k.endswith("_loss")]
        return sum(parts) if parts else None

    return [{"epoch": int(r.get("epoch", n)), "train_loss": total(r, "train"), "val_loss": total(r, "val"),
             "metric": r.get("metrics/mAP50(B)"), "metric_name": "mAP@0.5 (ultralytics val)" if "metrics/mAP50(B)" in r
             else None} for n, r in enumerate(records, start=1)]


def format_epoch(record) -> str:
    """One readable log line from a detector's per-epoch record (a dict of losses and metrics)."""
    if not isinstance(record, dict):
        return str(record)
    parts = [f"epoch {record.get('epoch', '?')}/{record.get('epochs', '?')}"]
    for key, value in record.items():
        if key not in ("epoch", "epochs", "final") and isinstance(value, (int, float)):
            parts.append(f"{key.replace('metrics/', '').replace('(B)', '')} {value:.4g}")
    return " | ".join(parts)
