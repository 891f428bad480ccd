"""The study-level classifier as a task kind: k fold timm models, class probabilities, soft pseudo labels.

A generation is the k fold models of one rung of the ladder. Generation 0 is the cycle-0 teacher
(labeled data only, light augmentation); generation g > 0 is the noised student of cycle g,
trained on labeled images (ground truth blended with the previous generation's OOF soft label)
plus the pseudo-labeled images the previous generation selected. Every generation's fold ensemble
is the teacher of the next. Probabilities are stored raw; temperature and thresholds apply when a
student's targets are built.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ...augment.transforms import student_transform, teacher_transform
from ...datasets.atomic import read_json, read_table, write_json, write_table
from ...datasets.config import config_to_dict, fingerprint
from ...datasets.table import ItemTable
from ...datasets.torch_data import ClassificationDataset
from ...loops.checkpoint import preprocess_from_meta, save_checkpoint
from ...loops.crossfit import FoldPlan
from ...loops.metrics import classification_metrics
from ...loops.predict import predict_probs
from ...loops.train import fit
from ...loops.trainer import ProgressHook
from .. import pseudo
from ..config import ladder_value, matched_epochs
from ..evaluation import class_truth_precision, class_truth_precision_per_class
from ..fusion import MODEL_SEPARATOR
from ..layout import (CHECKPOINT, CLASS_PSEUDO, CLASS_PSEUDO_INFO, CLASS_SELECTION, CLASSIFIER, HISTORY, LABELED_FOLDS,
                      OOF, POOL, POOL_FOLDS, fold_of_model, prob_columns, pseudo_fold_dir)
from ..models import AuxMaskClassifier, create_classifier, load_classifier, plain_classifier
from .aux_masks import aux_masks
from .base import (Task, assert_fold_lineage, fold_seed, of_fold, seed_everything, student_totals,
                   warn_starving)

log = logging.getLogger("cxr.cycle")


@dataclass(frozen=True)
class TrainingSet:
    """What one fold model trains on: image ids (repeated by balancing copies), targets, weights."""

    image_ids: list[str]
    targets: np.ndarray
    weights: np.ndarray
    generation: int = 0
    pseudo_count: int = 0
    """How many of the rows (the last ones) are pseudo labels."""
    labeled_share: float = 0.0
    """Share of the draws that are labeled rows (``pseudo.labeled_share``); 0: uniform."""

    def fingerprint_payload(self) -> dict:
        out = {"ids": self.image_ids, "targets": np.round(self.targets, 6).tolist(), "weights": self.weights.tolist()}
        if self.labeled_share and self.pseudo_count:  # only then: other runs keep their fingerprints
            out["labeled_share"] = self.labeled_share
        return out

    def labeled_part(self) -> "TrainingSet":
        """The labeled rows alone (a fine-tuning phase's training set)."""
        n = len(self.image_ids) - self.pseudo_count
        return replace(self, image_ids=self.image_ids[:n], targets=self.targets[:n], weights=self.weights[:n],
                       pseudo_count=0)

    def sampler_weights(self) -> np.ndarray | None:
        is_pseudo = np.arange(len(self.image_ids)) >= len(self.image_ids) - self.pseudo_count
        return pseudo.labeled_share_weights(is_pseudo, share=self.labeled_share)


class ClassifierTask(Task):
    name = CLASSIFIER

    # ------------------------------------------------------------------ which images
    def labeled_ids(self) -> list[str]:
        """Labeled images with a study label (a box-only image has no target to train or score on)."""
        has = set(self.table.items.loc[self.table.items["has_study_label"], "image_id"])
        return [i for i in self.ctx.labeled_ids if i in has]

    def pool_ids(self) -> list[str]:
        """Unlabeled and test images, and labeled ones without a study label: the detector's
        negatives and the gate read P(abnormal) of every image."""
        return self.images_without(self.ctx.table.items["has_study_label"])

    def every_fold_ids(self) -> list[str]:
        """The pool and the labeled images: a student fold blends its targets with its own teacher
        fold's predictions of them (``labeled_folds.csv``)."""
        return self.pool_ids() + self.labeled_ids()

    @property
    def columns(self) -> list[str]:
        return prob_columns(self.table.study_classes)

    @property
    def loss_kind(self) -> str:
        if self.cfg.classifier.loss != "auto":
            return self.cfg.classifier.loss
        return "softmax" if self.table.label_mode == "multiclass" else "bce"

    def model_name(self, gen: int) -> str:
        return ladder_value(self.cfg.classifier.ladder, gen)

    def student_steps(self) -> float:
        return self.cfg.classifier.student_steps

    def finetune_section(self):
        return self.cfg.classifier

    # ------------------------------------------------------------------ plans
    def payload(self, gen: int) -> dict:
        """What makes generation ``gen``'s models: its own rung of every ladder, not the ladders, so
        a change to a student's recipe (or to how pseudo labels are chosen, which reaches training
        through the training set's own fingerprint) never retrains the teacher."""
        cfg, c = self.cfg, self.cfg.classifier
        return {"model": self.model_name(gen), "drop_rate": ladder_value(c.drop_rate, gen),
                "drop_path_rate": ladder_value(c.drop_path_rate, gen), "pretrained": c.pretrained, "loss": c.loss,
                "randaugment": [ladder_value(cfg.augment.randaugment_n, gen), ladder_value(cfg.augment.randaugment_m, gen)],
                "tta_hflip": cfg.augment.tta_hflip, "train": config_to_dict(c.train), "pre": config_to_dict(cfg.preprocess),
                "seed": cfg.run.seed, "gen": gen}

    def fold_plans(self, gen: int, pseudo_dir: Path | None, teacher: Path | None, extra_ids: Sequence[str] = (),
                   *, steps_factor: float | None = None, patience: int = 0) -> list[FoldPlan]:
        """Fold k's training set: the labeled images of the other folds (targets blended with
        teacher fold k's soft labels from cycle 1 on) + the pseudo labels chosen for fold k.

        Why fold k's own sources: teacher fold k is the one model of the previous generation that
        never saw fold k's labels; pseudo labels or soft targets from any other fold model (or the
        whole ensemble) would carry fold k's labels into the student that is scored on fold k, and
        every OOF metric and OOF-chosen threshold after it would be optimistic.
        """
        labeled = read_table(teacher / LABELED_FOLDS) if teacher else None
        pool = read_table(teacher / POOL_FOLDS) if teacher and (teacher / POOL_FOLDS).exists() else None
        folds, plans, train = self.ctx.folds, [], self.cfg.classifier.train
        for fold in range(self.cfg.folds.k):
            train_ids = [i for i in self.labeled_ids() if folds[i] != fold] + list(extra_ids)
            val_ids = [i for i in self.labeled_ids() if folds[i] == fold]
            selected = None
            if pseudo_dir is not None:
                selected = read_table(pseudo_fold_dir(pseudo_dir, fold) / CLASS_PSEUDO)
                assert_fold_lineage(fold, selected["models"], read_json(pseudo_fold_dir(pseudo_dir, fold) /
                                                                         CLASS_PSEUDO_INFO)["threshold_oof_folds"],
                                    where=pseudo_fold_dir(pseudo_dir, fold))
            ts = replace(self.student_targets(train_ids, of_fold(labeled, fold), selected, of_fold(pool, fold)),
                         generation=gen)
            epochs = matched_epochs(train.epochs, len(train_ids) - len(extra_ids), len(ts.image_ids),
                                    self.steps_factor(gen, steps_factor))
            plans.append(FoldPlan(fold, ts, tuple(ts.image_ids), tuple(val_ids), epochs,
                                  {"train": fingerprint(ts.fingerprint_payload()),
                                   "sources": f"f{fold}" if teacher else None, **self.finetune_payload(gen)},
                                  patience=patience))
        return plans

    def student_targets(self, labeled_ids: list[str], soft: pd.DataFrame | None, pseudo_rows: pd.DataFrame | None,
                        pool_probs: pd.DataFrame | None) -> TrainingSet:
        """Targets for one fold's training images, built from stored raw probabilities.

        Args:
            labeled_ids: the labeled images this fold trains on (its own fold excluded).
            soft: the teacher fold model's probabilities of those images (None for generation 0:
                plain ground truth).
            pseudo_rows: balanced pseudo-label selection (image_id, copies), None for generation 0.
            pool_probs: the same teacher fold model's probabilities on the unlabeled pool.
        """
        cfg, cols = self.cfg, self.columns
        gt = self.table.study_targets(labeled_ids)
        if soft is not None and cfg.pseudo.labeled_blend > 0:
            gt = pseudo.blend_targets(gt, soft.set_index("image_id").loc[labeled_ids, cols].to_numpy(),
                                      weight=cfg.pseudo.labeled_blend)
        ids, targets, weights = list(labeled_ids), [gt], [np.ones(len(labeled_ids), np.float32)]
        if pseudo_rows is not None and len(pseudo_rows):
            probs = pool_probs.set_index("image_id").loc[pseudo_rows["image_id"], cols].to_numpy()
            soft = pseudo.pseudo_targets(probs, mode=self.table.label_mode, target=cfg.pseudo.mode,
                                         temperature=cfg.pseudo.temperature)
            repeats = pseudo_rows["copies"].to_numpy(int)
            ids += list(np.repeat(pseudo_rows["image_id"].to_numpy(), repeats))
            targets.append(np.repeat(soft, repeats, axis=0))
            weights.append(np.full(int(repeats.sum()), cfg.pseudo.weight, np.float32))
        return TrainingSet(ids, np.concatenate(targets).astype(np.float32), np.concatenate(weights),
                           pseudo_count=len(ids) - len(labeled_ids), labeled_share=cfg.pseudo.labeled_share)

    # ------------------------------------------------------------------ one fold
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict:
        """Train one fold model and write its checkpoint (with its preprocessing) and history."""
        cfg, pp = self.cfg, self.cfg.preprocess
        training = plan.train
        gen = training.generation
        name = self.model_name(gen)
        drop, drop_path = ladder_value(cfg.classifier.drop_rate, gen), ladder_value(cfg.classifier.drop_path_rate, gen)
        n, m = ladder_value(cfg.augment.randaugment_n, gen), ladder_value(cfg.augment.randaugment_m, gen)
        seed = fold_seed(cfg.run.seed, gen, plan.fold)
        seed_everything(seed)
        model = create_classifier(name, len(self.table.study_classes), drop_rate=drop, drop_path_rate=drop_path,
                                  pretrained=cfg.classifier.pretrained)
        transform = student_transform(pp.size, n, m) if n > 0 else teacher_transform(pp.size)
        load = self.ctx.loader()
        if cfg.classifier.aux_mask != "off":
            model = AuxMaskClassifier(model, aux_weight=cfg.classifier.aux_mask_weight)
        val_ds = ClassificationDataset(load, list(plan.val_ids), self.table.study_targets(plan.val_ids), None, None,
                                       pp.mean, pp.std)
        train = cfg.classifier.train
        logdir = self.tensorboard_dir(out_dir, plan.fold)
        labeled = training.labeled_part()
        phases = self.training_phases(gen, plan.epochs, len(training.image_ids), len(labeled.image_ids), train.lr)
        results = []
        for epochs, lr, labeled_only in phases:
            part, label = (labeled, " fine-tune") if labeled_only else (training, "")
            hooks = [ProgressHook()]
            if logdir is not None:  # the fine-tuning phase's scalars beside the first phase's, in their own run
                from ...loops.tensorboard import TensorBoardHook

                hooks.append(TensorBoardHook(logdir / "finetune" if labeled_only else logdir))
            train_ds = ClassificationDataset(load, part.image_ids, part.targets, part.weights, transform, pp.mean,
                                             pp.std, mask_of=aux_masks(self.ctx, self.table, part.image_ids))
            # early stopping selects an epoch: it implies keeping the best one
            train_cfg = replace(train, epochs=epochs, lr=lr, patience=plan.patience or train.patience,
                                keep="best" if plan.patience else train.keep)
            results.append(fit(model, train_ds, val_ds, train_cfg, loss=self.loss_kind,
                               metric_fn=self.validation_metric(), device=self.ctx.device, seed=seed + len(results),
                               log=log.info, name=self.run_name(out_dir, gen, plan.fold) + label, hooks=hooks,
                               sampler_weights=part.sampler_weights()))
        result = results[-1]
        meta = {
            "model_name": name, "num_classes": len(self.table.study_classes),
            "class_names": list(self.table.study_classes), "drop_rate": drop, "drop_path_rate": drop_path,
            "preprocess": config_to_dict(pp), "activation": "softmax" if self.loss_kind == "softmax" else "sigmoid",
            "label_mode": self.table.label_mode, "generation": gen, "fold": plan.fold, "randaugment": [n, m],
            "epochs": plan.epochs, "finetune_epochs": sum(e for e, _, only in phases if only),
            "config": config_to_dict(cfg),
        }
        save_checkpoint(out_dir / CHECKPOINT, plain_classifier(model), meta)
        epochs_run = sum(r.epochs_run for r in results)
        write_json(out_dir / HISTORY, {"history": [dict(row, phase=p) for p, r in enumerate(results) for row in r.history],
                                       "best_metric": result.best_metric, "epochs_run": epochs_run})
        return {"best_metric": result.best_metric, "epochs_run": epochs_run, "model": name,
                "train_images": len(set(training.image_ids)), "train_samples": len(training.image_ids)}

    def validation_metric(self) -> Callable[[np.ndarray, np.ndarray], float]:
        """Validation metric for early stopping: macro AUC, falling back to accuracy when undefined."""
        classes, mode = list(self.table.study_classes), self.table.label_mode

        def metric(y_true: np.ndarray, probs: np.ndarray) -> float:
            m = classification_metrics(y_true, probs, classes, mode)
            return m["auc_macro"] if m.get("auc_macro") is not None else m["accuracy"]

        return metric

    # ------------------------------------------------------------------ prediction
    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame:
        """Raw class probabilities of one fold model, flip-TTA averaged, read through the cache of
        the checkpoint's own preprocessing."""
        model, meta = load_classifier(fold_dir / CHECKPOINT, self.ctx.device)
        pp = meta["preprocess"]
        ids = list(image_ids)
        ds = ClassificationDataset(self.ctx.loader(preprocess_from_meta(meta)), ids,
                                   np.zeros((len(ids), len(self.columns)), np.float32), None, None, pp["mean"], pp["std"])
        probs = predict_probs(model, ds, device=self.ctx.device, batch_size=self.cfg.classifier.train.batch_size,
                              tta_hflip=self.cfg.augment.tta_hflip, activation=meta["activation"])
        return pd.DataFrame(probs, columns=self.columns).assign(image_id=ids)

    def write_predictions(self, oof: pd.DataFrame, every: pd.DataFrame, out_dir: Path) -> dict:
        """oof.csv (image_id, fold, p:*), pool_folds.csv (every fold model on every pool image),
        pool.csv (their mean: the ensemble), labeled_folds.csv (every fold model on every labeled
        image). Probabilities are raw: nothing is thresholded here."""
        cols = ["image_id", "fold", *self.columns]
        write_table(out_dir / OOF, oof[cols])
        labeled = every["image_id"].isin(set(self.labeled_ids()))
        write_table(out_dir / LABELED_FOLDS, every[labeled][cols])
        pool = every[~labeled]
        if len(pool):
            write_table(out_dir / POOL_FOLDS, pool[cols])
            write_table(out_dir / POOL, pool.groupby("image_id", sort=True)[self.columns].mean().reset_index())
        return {"oof_images": len(oof), "pool_images": int(pool["image_id"].nunique()) if len(pool) else 0}

    # ------------------------------------------------------------------ pseudo labels
    def select(self, teachers: dict[str, Path], out_dir: Path, cycle: int) -> dict:
        """The ensemble's pseudo labels (what the report and the exports show) and, per fold k, the
        ones student fold k trains on: teacher fold k's probabilities, thresholds read from the
        OOF predictions of the other folds."""
        preds = load_predictions(teachers[CLASSIFIER])
        unlabeled = set(self.ctx.ids("unlabeled"))
        empty = pd.DataFrame(columns=["image_id", "fold", *self.columns])
        pool, per_fold, oof = preds.get("pool", empty), preds.get("pool_folds", empty), preds["oof"]
        k = self.cfg.folds.k
        info = self.select_set(pool[pool["image_id"].isin(unlabeled)], oof, out_dir, cycle=cycle,
                               models=[f"f{f}" for f in range(k)], oof_folds=list(range(k)))
        info["folds"] = {}
        for fold in range(k):
            probs = of_fold(per_fold[per_fold["image_id"].isin(unlabeled)], fold)
            others = [f for f in range(k) if f != fold]
            info["folds"][str(fold)] = self.select_set(probs, oof[oof["fold"].isin(others)], pseudo_fold_dir(out_dir, fold),
                                                       cycle=cycle, models=[f"f{fold}"], oof_folds=others)
        info["students"] = student_totals(list(info["folds"].values()))
        return info

    def select_set(self, probs: pd.DataFrame, oof: pd.DataFrame, out_dir: Path, *, cycle: int,
                   models: list[str], oof_folds: list[int]) -> dict:
        """One selection: thresholds on ``oof`` (per class, at the target precision; or the global
        confidence), starving classes flagged and given the fallback, balancing, provenance."""
        cfg, table, cols = self.cfg, self.table, self.columns
        pc, classes, mode = cfg.pseudo, list(table.study_classes), table.label_mode
        thresholds = None
        if pc.target_precision > 0:
            thresholds = pseudo.class_thresholds(oof[cols].to_numpy(), table.study_targets(oof["image_id"]),
                                                 target_precision=pc.target_precision, mode=mode)
        support = pseudo.threshold_support(oof[cols].to_numpy(), mode=mode)
        selection = pseudo.select_pseudo(probs["image_id"].tolist(), probs[cols].to_numpy().reshape(-1, len(cols)),
                                         mode=mode, class_names=classes, confidence=pc.confidence, thresholds=thresholds)
        selection["rule"] = np.where(selection["kept"], "threshold" if thresholds is not None else "confidence", "")
        labeled = table.study_targets(self.labeled_ids())
        starving = pseudo.starving_classes(selection, support, num_classes=len(classes),
                                           min_support=pc.min_oof_support if thresholds is not None else 0,
                                           present=np.flatnonzero(np.nan_to_num(labeled).max(axis=0) >= 0.5))
        fallback_k = 0
        if starving and pc.fallback == "top_k" and len(selection):
            fallback_k = pseudo.fallback_size(selection, list(starving), fixed=pc.fallback_k)
            selection = pseudo.top_k_fallback(selection, list(starving), k=fallback_k)
        balanced = (pseudo.balance_classes(selection, per_class=pc.per_class, seed=cfg.run.seed)
                    if pc.balance else selection[selection["kept"]].assign(copies=1))
        provenance = {"cycle": cycle, "source": f"gen{cycle - 1}/{CLASSIFIER}",
                      "folds": "|".join(str(fold_of_model(m)) for m in models), "models": MODEL_SEPARATOR.join(models)}
        write_table(out_dir / CLASS_SELECTION, selection.assign(**provenance))
        write_table(out_dir / CLASS_PSEUDO, balanced.assign(**provenance))
        kept = selection[selection["kept"]]
        info = {"unlabeled": len(selection), "kept": int(len(kept)),
                "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
                "kept_per_class": {c: int((kept["label"] == c).sum()) for c in classes if (kept["label"] == c).any()},
                "thresholds": None if thresholds is None else dict(zip(classes, thresholds.tolist())),
                "support": dict(zip(classes, support.tolist())),
                "threshold_oof_folds": oof_folds, "models": models,
                "starving": {classes[c]: why for c, why in starving.items()},
                "fallback": {classes[c]: int(((kept["class_index"] == c) & (kept["rule"] == "top_k")).sum())
                             for c in starving} if fallback_k else {}, "fallback_mode": pc.fallback,
                "precision": class_truth_precision(selection, self.ctx.truth, mode),
                "precision_per_class": class_truth_precision_per_class(selection, self.ctx.truth, classes, mode)}
        warn_starving(CLASSIFIER, models, info, kept=info["kept_per_class"])
        write_json(out_dir / CLASS_PSEUDO_INFO, info)
        return info

    # ------------------------------------------------------------------ scores
    def score(self, pred_dir: Path) -> dict:
        preds = load_predictions(pred_dir)
        out = {"oof": self.evaluate(preds["oof"])}
        if "pool" in preds:
            pool = preds["pool"]
            out["test"] = self.evaluate(pool[pool["image_id"].isin(self.ctx.scored_test_ids())])
            if self.ctx.truth is not None:
                out["unlabeled_truth"] = self.evaluate(pool[pool["image_id"].isin(self.ctx.ids("unlabeled"))],
                                                       truth=self.ctx.truth)
        return out

    def evaluate(self, probs: pd.DataFrame, truth: ItemTable | None = None) -> dict | None:
        """Classification metrics of a probability table against the labels known for its images."""
        return evaluate_probs(self.table, probs, truth)


def evaluate_probs(table: ItemTable, probs: pd.DataFrame, truth: ItemTable | None = None) -> dict | None:
    source = truth if truth is not None else table
    labeled = set(source.items.loc[source.items["has_study_label"], "image_id"])
    ids = [i for i in probs["image_id"] if i in labeled]
    if not ids:
        return None
    p = probs.set_index("image_id").loc[ids, prob_columns(table.study_classes)].to_numpy()
    return classification_metrics(source.study_targets(ids), p, list(table.study_classes), table.label_mode)


def load_predictions(pred_dir: Path) -> dict[str, pd.DataFrame]:
    out = {"oof": read_table(pred_dir / OOF)}
    for name, file in (("pool", POOL), ("pool_folds", POOL_FOLDS)):
        if (pred_dir / file).exists():
            out[name] = read_table(pred_dir / file)
    return out
