"""Detectors: one interface (``base.Detector``), two adapters (``yolo``, ``effdet``), and the API the engine uses.

The rest of the engine imports only ``create_detector`` and ``load_detector`` from here; names a
test or a tool needs beyond those are imported from the module that defines them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ...datasets.errors import DataError
from ...loops.checkpoint import safe_torch_load
from ...loops.device import resolve_device
from .base import CHECKPOINT_FORMAT, Detector, plain_types
from .effdet import EffdetDetector
from .yolo import YoloDetector

KINDS = ("yolo", "effdet")
_CLASSES = {"yolo": YoloDetector, "effdet": EffdetDetector}


def create_detector(
    kind: Literal["yolo", "effdet"],
    name: str,
    num_classes: int,
    class_names: Sequence[str],
    img_size: int,
    *,
    preprocess: Any = None,
) -> Detector:
    """A new, untrained detector. ``preprocess``: the PreprocessConfig (or its dict) of the cache."""
    if kind not in _CLASSES:
        raise ValueError(f"detector kind must be one of {KINDS}, got {kind!r}")
    if dataclasses.is_dataclass(preprocess):
        preprocess = dataclasses.asdict(preprocess)
    return _CLASSES[kind](name, num_classes, class_names, img_size, plain_types(preprocess or {}))


def load_detector(path: str | Path, device: str | torch.device | None = "cpu") -> Detector:
    """Rebuild a detector from its checkpoint (``torch.load(weights_only=True)``) on ``device``."""
    ckpt = safe_torch_load(path, "detector checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("kind") not in _CLASSES:
        raise DataError(f"{path}: not a detector checkpoint of format {CHECKPOINT_FORMAT}")
    if not ckpt.get("preprocess"):
        raise DataError(f"{path}: the detector checkpoint carries no preprocessing (an older engine made it), so "
                        "its inputs cannot be reproduced: retrain it")
    det = create_detector(ckpt["kind"], ckpt["name"], ckpt["num_classes"], ckpt["class_names"], ckpt["img_size"], preprocess=ckpt["preprocess"])
    det.input_shape = tuple(ckpt["input_shape"]) if ckpt.get("input_shape") else None
    det.history = list(ckpt.get("history") or [])
    det._restore(ckpt)
    det._to_device(resolve_device(device))
    return det
