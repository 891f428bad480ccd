"""Classifier generations: k fold models, out-of-fold and pool predictions, student targets.

A generation is the k fold models of one rung of the ladder. Generation 0 is the cycle-0 teacher
(labeled data only, light augmentation); generation g > 0 is the noised student of cycle g,
trained on labeled images (ground truth blended with the previous generation's OOF soft label)
plus the pseudo-labeled images the previous generation selected. Every generation's fold ensemble
is the teacher of the next.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..augment.transforms import student_transform, teacher_transform
from ..datasets.table import ItemTable
from ..datasets.errors import DataError
from ..datasets.torch_data import ClassificationDataset
from ..loops.checkpoint import save_checkpoint
from .models import load_classifier
from ..loops.metrics import classification_metrics
from ..loops.predict import predict_probs
from ..datasets.atomic import read_table, write_json, write_table
from ..loops.train import fit
from . import pseudo
from .config import EngineConfig, ladder_value
from ..datasets.config import config_to_dict
from .models import create_classifier

PROB_PREFIX = "p:"


def prob_columns(class_names) -> list[str]:
    return [f"{PROB_PREFIX}{c}" for c in class_names]


def loss_kind(cfg: EngineConfig, table: ItemTable) -> str:
    if cfg.classifier.loss != "auto":
        return cfg.classifier.loss
    return "softmax" if table.label_mode == "multiclass" else "bce"


@dataclass(frozen=True)
class TrainingSet:
    """What one fold model trains on: image ids (repeated by balancing copies), targets, weights."""

    image_ids: list[str]
    targets: np.ndarray
    weights: np.ndarray

    def fingerprint_payload(self) -> dict:
        return {"ids": self.image_ids, "targets": np.round(self.targets, 6).tolist(), "weights": self.weights.tolist()}


def student_targets(
    cfg: EngineConfig, table: ItemTable, labeled_ids: list[str], oof: pd.DataFrame | None,
    pseudo_rows: pd.DataFrame | None, pool_probs: pd.DataFrame | None,
) -> TrainingSet:
    """Targets for one fold's training images, built from stored raw probabilities.

    Args:
        labeled_ids: the labeled images this fold trains on (its own fold excluded).
        oof: previous generation's OOF probabilities (None for generation 0: plain ground truth).
        pseudo_rows: balanced pseudo-label selection (image_id, copies), None for generation 0.
        pool_probs: previous generation's ensemble probabilities on the unlabeled pool.
    """
    cols = prob_columns(table.study_classes)
    gt = table.study_targets(labeled_ids)
    if oof is not None and cfg.pseudo.labeled_blend > 0:
        gt = pseudo.blend_targets(gt, oof.set_index("image_id").loc[labeled_ids, cols].to_numpy(),
                                  weight=cfg.pseudo.labeled_blend)
    ids, targets, weights = list(labeled_ids), [gt], [np.ones(len(labeled_ids), np.float32)]
    if pseudo_rows is not None and len(pseudo_rows):
        probs = pool_probs.set_index("image_id").loc[pseudo_rows["image_id"], cols].to_numpy()
        soft = pseudo.pseudo_targets(probs, mode=table.label_mode, target=cfg.pseudo.mode,
                                     temperature=cfg.pseudo.temperature)
        repeats = pseudo_rows["copies"].to_numpy(int)
        ids += list(np.repeat(pseudo_rows["image_id"].to_numpy(), repeats))
        targets.append(np.repeat(soft, repeats, axis=0))
        weights.append(np.full(int(repeats.sum()), cfg.pseudo.weight, np.float32))
    return TrainingSet(ids, np.concatenate(targets).astype(np.float32), np.concatenate(weights))


def metric_for(table: ItemTable, mode_loss: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """Validation metric for early stopping: macro AUC, falling back to accuracy when undefined."""

    def metric(y_true: np.ndarray, probs: np.ndarray) -> float:
        m = classification_metrics(y_true, probs, list(table.study_classes), table.label_mode)
        return m["auc_macro"] if m.get("auc_macro") is not None else m["accuracy"]

    return metric


def train_fold(
    cfg: EngineConfig, table: ItemTable, load: Callable, gen: int, fold: int,
    train: TrainingSet, val_ids: list[str], device: torch.device, out_dir: Path, log: Callable, *, epochs: int,
) -> dict:
    """Train one fold model of a generation and write checkpoint.pt + train_ids.txt + history.json."""
    size, pp = cfg.preprocess.size, cfg.preprocess
    name = ladder_value(cfg.classifier.ladder, gen)
    drop, drop_path = ladder_value(cfg.classifier.drop_rate, gen), ladder_value(cfg.classifier.drop_path_rate, gen)
    n, m = ladder_value(cfg.augment.randaugment_n, gen), ladder_value(cfg.augment.randaugment_m, gen)
    seed = cfg.run.seed * 1000 + gen * 10 + fold
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    model = create_classifier(name, len(table.study_classes), drop_rate=drop, drop_path_rate=drop_path,
                              pretrained=cfg.classifier.pretrained)
    transform = student_transform(size, n, m) if n > 0 else teacher_transform(size)
    train_ds = ClassificationDataset(load, train.image_ids, train.targets, train.weights, transform, pp.mean, pp.std)
    val_ds = ClassificationDataset(load, val_ids, table.study_targets(val_ids), None, None, pp.mean, pp.std)
    kind = loss_kind(cfg, table)
    train_cfg = replace(cfg.classifier.train, epochs=epochs)
    result = fit(model, train_ds, val_ds, train_cfg, loss=kind, metric_fn=metric_for(table, kind),
                 device=device, seed=seed, log=log)
    meta = {
        "model_name": name, "num_classes": len(table.study_classes), "class_names": list(table.study_classes),
        "drop_rate": drop, "drop_path_rate": drop_path, "preprocess": config_to_dict(pp),
        "activation": "softmax" if kind == "softmax" else "sigmoid", "label_mode": table.label_mode,
        "generation": gen, "fold": fold, "randaugment": [n, m], "epochs": epochs, "config": config_to_dict(cfg),
    }
    save_checkpoint(out_dir / "checkpoint.pt", model, meta)
    (out_dir / "train_ids.txt").write_text("\n".join(sorted(set(train.image_ids))) + "\n")
    write_json(out_dir / "history.json", {"history": result.history, "best_metric": result.best_metric,
                                          "epochs_run": result.epochs_run})
    return {"best_metric": result.best_metric, "epochs_run": result.epochs_run, "model": name,
            "train_images": len(set(train.image_ids)), "train_samples": len(train.image_ids)}


def fold_models(gen_dir: Path, k: int) -> list[Path]:
    return [gen_dir / f"fold{f}" / "checkpoint.pt" for f in range(k)]


def assert_out_of_fold(oof_ids: list[str], fold_of_model: list[int], folds: pd.Series, gen_dir: Path) -> None:
    """The OOF contract, checked at run time: every labeled image predicted exactly once, by the
    fold model whose training set did not contain it."""
    counts = pd.Series(oof_ids).value_counts()
    if (counts != 1).any() or set(counts.index) != set(folds.index):
        missing = sorted(set(folds.index) - set(counts.index))[:3]
        raise DataError(f"{gen_dir}: OOF predictions cover labeled images {len(counts)} times/ids; missing {missing}")
    for image_id, fold in zip(oof_ids, fold_of_model):
        if folds[image_id] != fold:
            raise DataError(f"{gen_dir}: image {image_id} of fold {folds[image_id]} predicted by fold model {fold}")
    for fold in sorted(set(fold_of_model)):
        seen = set((gen_dir / f"fold{fold}" / "train_ids.txt").read_text().split())
        leaked = seen & set(folds.index[folds == fold])
        if leaked:
            raise DataError(f"{gen_dir}: fold model {fold} trained on {len(leaked)} of the images it predicts OOF, "
                            f"e.g. {sorted(leaked)[0]}")


def predict_generation(
    cfg: EngineConfig, table: ItemTable, load_for: Callable, folds: pd.Series, gen_dir: Path,
    pool_ids: list[str], device: torch.device, out_dir: Path,
) -> dict:
    """OOF probabilities on labeled images, fold-ensemble probabilities on the pool (unlabeled + test).

    Writes oof.csv (image_id, fold, p:*), pool_folds.csv (image_id, fold, p:*: every fold model on
    every pool image, for the agreement plots) and pool.csv (mean over folds; TTA inside each).
    Probabilities are raw; nothing is thresholded here.
    """
    cols = prob_columns(table.study_classes)
    oof_parts, pool_parts = [], []
    for fold, ckpt in enumerate(fold_models(gen_dir, cfg.folds.k)):
        model, meta = load_classifier(ckpt, device)
        load = load_for(meta)  # the checkpoint's own preprocessing decides which cache is read
        pp = meta["preprocess"]
        fold_ids = list(folds.index[folds == fold])
        for ids, parts in ((fold_ids, oof_parts), (pool_ids, pool_parts)):
            if not ids:
                continue
            ds = ClassificationDataset(load, ids, np.zeros((len(ids), len(cols)), np.float32), None, None,
                                       pp["mean"], pp["std"])
            probs = predict_probs(model, ds, device=device, batch_size=cfg.classifier.train.batch_size,
                                  tta_hflip=cfg.augment.tta_hflip, activation=meta["activation"])
            parts.append(pd.DataFrame(probs, columns=cols).assign(image_id=ids, fold=fold))
    oof = pd.concat(oof_parts, ignore_index=True)[["image_id", "fold", *cols]]
    assert_out_of_fold(oof["image_id"].tolist(), oof["fold"].tolist(), folds, gen_dir)
    write_table(out_dir / "oof.csv", oof)
    if pool_parts:
        per_fold = pd.concat(pool_parts, ignore_index=True)[["image_id", "fold", *cols]]
        write_table(out_dir / "pool_folds.csv", per_fold)
        write_table(out_dir / "pool.csv", per_fold.groupby("image_id", sort=True)[cols].mean().reset_index())
    return {"oof_images": len(oof), "pool_images": len(pool_ids)}


def evaluate(table: ItemTable, probs: pd.DataFrame, truth: ItemTable | None = None) -> dict | None:
    """Classification metrics of a probability table against the labels known for its images."""
    source = truth if truth is not None else table
    labeled = set(source.items.loc[source.items["has_study_label"], "image_id"])
    ids = [i for i in probs["image_id"] if i in labeled]
    if not ids:
        return None
    p = probs.set_index("image_id").loc[ids, prob_columns(table.study_classes)].to_numpy()
    return classification_metrics(source.study_targets(ids), p, list(table.study_classes), table.label_mode)


def load_predictions(pred_dir: Path) -> dict[str, pd.DataFrame]:
    out = {"oof": read_table(pred_dir / "oof.csv")}
    for name in ("pool", "pool_folds"):
        if (pred_dir / f"{name}.csv").exists():
            out[name] = read_table(pred_dir / f"{name}.csv")
    return out
