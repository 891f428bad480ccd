"""Detector generations: k fold detectors, OOF boxes, WBF-fused pool boxes, pseudo boxes.

Mirrors :mod:`teacher_student.classification` for the image-level half of the engine. Only images
whose boxes are ground truth (``box_labeled``) train and score a detector; the pool it pseudo-labels
is the unlabeled role plus labeled images nobody drew boxes on (``box_annotated = 0``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..datasets.adapters import training_boxes
from ..datasets.boxes import BOX_COLUMNS
from ..datasets.table import ItemTable
from ..datasets.errors import DataError
from ..loops.det_metrics import mean_average_precision, true_positive_mask
from ..datasets.atomic import read_table, write_json, write_table
from . import pseudo
from .config import EngineConfig, ladder_value
from .detectors import create_detector, load_detector
from .fusion import fuse_boxes

BOX_OUT = ["image_id", "class_id", *BOX_COLUMNS, "score"]


def training_set(
    gt: pd.DataFrame, train_ids: list[str], pseudo_boxes: pd.DataFrame | None, pseudo_images: pd.DataFrame | None,
) -> tuple[list[str], pd.DataFrame]:
    """Images and boxes of one fold: ground truth of its labeled images + the selected pseudo boxes
    (images with status "boxes" or "negative"; "uncertain" ones are left out)."""
    ids = list(train_ids)
    boxes = [gt[gt["image_id"].isin(set(train_ids))][["image_id", "class_id", *BOX_COLUMNS]]]
    if pseudo_images is not None and len(pseudo_images):
        chosen = pseudo_images[pseudo_images["status"].isin(["boxes", "negative"])]["image_id"].tolist()
        ids += chosen
        boxes.append(pseudo_boxes[pseudo_boxes["image_id"].isin(set(chosen))][["image_id", "class_id", *BOX_COLUMNS]])
    return ids, pd.concat(boxes, ignore_index=True)


def train_fold(
    cfg: EngineConfig, table: ItemTable, load: Callable, gen: int, fold: int, train_ids: list[str],
    boxes: pd.DataFrame, val_ids: list[str], device: torch.device, out_dir: Path, log: Callable, *, epochs: int,
) -> dict:
    """Train one fold detector of a generation; write detector checkpoint and train_ids.txt."""
    dc = cfg.detector
    name = ladder_value(dc.ladder, gen)
    detector = create_detector(dc.kind, name, len(table.box_classes), list(table.box_classes), dc.img_size)
    seed = cfg.run.seed * 1000 + gen * 10 + fold
    result = detector.fit(train_ids, val_ids, boxes, load, out_dir / "work", epochs=epochs, batch_size=dc.batch_size,
                          lr=dc.lr, img_size=dc.img_size, randaugment_n=ladder_value(dc.randaugment_n, gen),
                          randaugment_m=ladder_value(dc.randaugment_m, gen), hflip=dc.hflip, device=str(device), seed=seed,
                          log=lambda record: log(format_epoch(record)))
    detector.save(out_dir / "detector.pt")
    (out_dir / "train_ids.txt").write_text("\n".join(sorted(set(train_ids))) + "\n")
    return {"model": name, "epochs": epochs, "train_images": len(set(train_ids)), "train_boxes": int(len(boxes)),
            "fit": result if isinstance(result, dict) else None}


def predict_views(detector, ids: list[str], load: Callable, cfg: EngineConfig, device: torch.device, tag: str) -> pd.DataFrame:
    if not ids:
        return pd.DataFrame(columns=[*BOX_OUT, "model"])
    raw = detector.predict(ids, load, tta_hflip=tta_flip(cfg), conf_floor=cfg.detector.conf_floor,
                           device=str(device), batch_size=cfg.detector.batch_size)
    return raw.assign(model=[f"{tag}/{v}" for v in raw["view"]])[[*BOX_OUT, "model"]]


def fuse(cfg: EngineConfig, raw: pd.DataFrame, models: list[str], workers: int) -> pd.DataFrame:
    dc = cfg.detector
    return fuse_boxes(raw, iou_thr=dc.iou_thr, skip_box_thr=dc.skip_box_thr, conf_type=dc.conf_type, models=models,
                      workers=workers)


def view_names(cfg: EngineConfig, tag: str) -> list[str]:
    return [f"{tag}/orig"] + ([f"{tag}/hflip"] if tta_flip(cfg) else [])


def tta_flip(cfg: EngineConfig) -> bool:
    return cfg.augment.tta_hflip and cfg.detector.hflip


def format_epoch(record) -> str:
    """One readable log line from a detector's per-epoch record (a dict of losses and metrics)."""
    if not isinstance(record, dict):
        return str(record)
    parts = [f"detector epoch {record.get('epoch', '?')}/{record.get('epochs', '?')}"]
    for key, value in record.items():
        if key not in ("epoch", "epochs", "final") and isinstance(value, (int, float)):
            parts.append(f"{key.replace('metrics/', '').replace('(B)', '')} {value:.4g}")
    return " | ".join(parts)


def predict_generation(
    cfg: EngineConfig, load: Callable, folds: pd.Series, det_labeled: list[str], gen_dir: Path,
    pool_ids: list[str], device: torch.device, out_dir: Path,
) -> dict:
    """OOF boxes (each box-labeled image by the fold model that never saw it, TTA views fused) and
    pool boxes from every fold x view, fused with WBF. Raw per-model pool boxes are kept too."""
    oof_parts, pool_parts, models = [], [], []
    for fold in range(cfg.folds.k):
        fold_dir = gen_dir / f"fold{fold}"
        detector = load_detector(fold_dir / "detector.pt", str(device))
        fold_ids = [i for i in det_labeled if folds[i] == fold]
        seen = set((fold_dir / "train_ids.txt").read_text().split())
        if seen & set(fold_ids):
            raise DataError(f"{fold_dir}: detector fold {fold} trained on images it predicts out-of-fold, "
                            f"e.g. {sorted(seen & set(fold_ids))[0]}")
        tag = f"f{fold}"
        oof_raw = predict_views(detector, fold_ids, load, cfg, device, tag)
        oof_parts.append(fuse(cfg, oof_raw, view_names(cfg, tag), 0).assign(fold=fold))
        pool_parts.append(predict_views(detector, pool_ids, load, cfg, device, tag))
        models += view_names(cfg, tag)
    oof = pd.concat(oof_parts, ignore_index=True)
    write_table(out_dir / "oof_boxes.csv", oof)
    raw = pd.concat(pool_parts, ignore_index=True)
    write_table(out_dir / "pool_raw.csv", raw)
    fused = fuse(cfg, raw, models, cfg.detector.workers)
    write_table(out_dir / "pool_fused.csv", fused)
    return {"oof_boxes": int(len(oof)), "pool_raw": int(len(raw)), "pool_fused": int(len(fused)),
            "models": models}


def mark_true_positives(pred: pd.DataFrame, gt: pd.DataFrame, *, iou_thr: float) -> pd.DataFrame:
    """Predictions with a ``true_positive`` column (the mAP metric's matching rule)."""
    return pred.assign(true_positive=true_positive_mask(pred, gt, iou_thr=iou_thr))


def evaluate(table: ItemTable, gt: pd.DataFrame, pred: pd.DataFrame, image_ids: list[str], iou_thr: float) -> dict | None:
    """mAP of predictions on the given box-labeled images (None when there are none)."""
    if not image_ids:
        return None
    return mean_average_precision(pred, gt, num_classes=len(table.box_classes), iou_thr=iou_thr,
                                  class_names=list(table.box_classes), image_ids=image_ids)


def select_pseudo_boxes(
    cfg: EngineConfig, table: ItemTable, gt: pd.DataFrame, pred_dir: Path, pool_ids: list[str],
    p_abnormal: pd.Series, out_dir: Path, *, cycle: int,
) -> dict:
    """Per-class thresholds from OOF at the target precision, then kept boxes / negatives."""
    dc = cfg.detector
    oof = read_table(pred_dir / "oof_boxes.csv")
    matched = mark_true_positives(oof, gt, iou_thr=dc.metric_iou)
    thresholds = pseudo.box_thresholds(matched, num_classes=len(table.box_classes), target_precision=dc.target_precision)
    fused = read_table(pred_dir / "pool_fused.csv")
    fused = fused[fused["image_id"].isin(set(pool_ids))]
    boxes, images = pseudo.select_pseudo_boxes(fused, pool_ids, p_abnormal, thresholds=thresholds,
                                               negative_max_p_abnormal=dc.negative_max_p_abnormal)
    write_table(out_dir / "box_oof_matched.csv", matched)
    boxes = boxes.assign(cycle=cycle, source=f"gen{cycle - 1}/detector")  # provenance: models column = folds x views
    write_table(out_dir / "box_pseudo.csv", boxes)
    write_table(out_dir / "box_images.csv", images)
    status = images["status"].value_counts().to_dict()
    return {"thresholds": dict(zip(table.box_classes, [None if np.isinf(t) else float(t) for t in thresholds])),
            "boxes": int(len(boxes)), "images": {k: int(v) for k, v in status.items()},
            "per_class": {table.box_classes[int(c)]: int(n) for c, n in boxes.groupby("class_id").size().items()}
            if len(boxes) else {}}
