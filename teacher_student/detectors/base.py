"""The detector interface and what every adapter shares: the prediction table and the checkpoint.

Why an interface: the cycle (teachers -> OOF -> pseudo boxes -> students) must not care which
library trains the boxes. Every adapter (``yolo.YoloDetector``, ``effdet.EffdetDetector``) reads the
same cached uint8 (size, size) images through ``load(image_id)``, takes and returns boxes in the
engine convention (normalized xyxy, 0-based class), and writes one checkpoint that carries what
prediction needs (kind, model name, class names, input size, preprocessing, the cache image shape)
so prediction never restates them by hand.

Prediction returns one row per box and view ("orig", "hflip"); hflip boxes are already mapped back
to the original image with ``datasets.boxes.hflip``. The caller fuses views x folds with
``teacher_student.fusion.fuse_boxes``. Classes that name a side ("Right Lung") must not be trained
or predicted with horizontal flips: pass ``hflip=False`` to ``fit`` and ``tta_hflip=False``.

Checkpoints are ``torch.save`` of plain types + tensors (a state dict, never a pickled module), so
``load_detector`` (in the package ``__init__``) uses ``torch.load(weights_only=True)``; the YOLO
module is rebuilt from its YAML dict and the effdet module from its name.
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ...datasets.atomic import atomic_path
from ...datasets.boxes import BOX_COLUMNS, hflip
from ...datasets.det_data import check_image
from ...datasets.errors import DataError
from ...loops.device import resolve_device

PREDICTION_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "score", "view"]
CHECKPOINT_FORMAT = 1
LoadFn = Callable[[str], np.ndarray]
LogFn = Callable[[dict], None]
logger = logging.getLogger(__package__)
"""One logger for the package (the name the single detectors.py module had)."""


def empty_predictions() -> pd.DataFrame:
    """The prediction table with no rows, with the right columns and dtypes."""
    cols = {"image_id": pd.Series(dtype="str"), "class_id": pd.Series(dtype="int64")}
    cols.update({c: pd.Series(dtype="float32") for c in BOX_COLUMNS})
    cols.update({"score": pd.Series(dtype="float32"), "view": pd.Series(dtype="str")})
    return pd.DataFrame(cols)[PREDICTION_COLUMNS]


class Detector(abc.ABC):
    """Train on a fold, predict boxes with flip TTA, save/load a self-describing checkpoint.

    Subclasses implement ``fit``, ``_predict_arrays`` (one batch of uint8 images -> boxes),
    ``_state`` / ``_restore`` (what goes into the checkpoint) and ``_to_device``.
    """

    kind: str = ""

    def __init__(self, name: str, num_classes: int, class_names: Sequence[str], img_size: int, preprocess: dict | None = None):
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        self.name, self.num_classes = str(name), int(num_classes)
        self.class_names = [str(c) for c in class_names]
        self.img_size = 0
        self._set_img_size(img_size)
        self.preprocess = dict(preprocess or {})
        self.input_shape: tuple[int, int] | None = None
        """Shape of the cache images seen in training; prediction checks its images against it."""
        self.device = torch.device("cpu")
        self.history: list[dict] = []

    size_multiple: int = 32
    """Input sizes must be a multiple of the model's largest stride."""

    def _set_img_size(self, img_size: int | None) -> None:
        if img_size is None:
            return
        if int(img_size) <= 0 or int(img_size) % self.size_multiple:
            raise ValueError(f"{self.kind} img_size must be a positive multiple of {self.size_multiple}, got {img_size}")
        self.img_size = int(img_size)

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def fit(
        self,
        train_ids: Sequence[str],
        val_ids: Sequence[str],
        boxes_df: pd.DataFrame,
        load: LoadFn,
        workdir: str | Path,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        img_size: int | None = None,
        randaugment_n: int = 0,
        randaugment_m: float = 0,
        hflip: bool = True,
        device: str | torch.device | None = "cpu",
        seed: int = 0,
        log: LogFn | None = None,
        run_name: str | None = None,
        patience: int = 0,
        warm_start: bool = False,
    ) -> dict:
        """Train on ``train_ids`` (boxes from ``boxes_df``; an image without rows is a negative).

        ``patience`` > 0 stops after that many epochs without a better validation score (0: never).
        ``warm_start`` starts from this detector's current weights (a fine-tuning phase after a first
        ``fit``) instead of fresh ones.

        ``run_name`` (e.g. "detector gen 1 fold 2") names the run in training errors.
        Returns a summary dict (epochs run, best epoch, last metrics). Writes only under ``workdir``.
        """

    def _remember_input(self, load: LoadFn, image_id: str) -> None:
        self.input_shape = tuple(int(s) for s in check_image(load(image_id), image_id).shape)

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        image_ids: Sequence[str],
        load: LoadFn,
        *,
        tta_hflip: bool = True,
        conf_floor: float = 0.01,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> pd.DataFrame:
        """Boxes for every image and view, scores >= ``conf_floor``, in the engine convention.

        Boxes that end with zero area after clipping to the image (predicted wholly outside it)
        are not returned: they are no box at all, and ``fuse_boxes`` would reject them.
        """
        if device is not None:
            self._to_device(resolve_device(device))
        views = ["orig", "hflip"] if tta_hflip else ["orig"]
        parts = []
        ids = [str(i) for i in image_ids]
        for start in range(0, len(ids), max(1, batch_size)):
            batch_ids = ids[start : start + batch_size]
            images = [self._checked_image(load(i), i) for i in batch_ids]
            for view in views:
                batch = images if view == "orig" else [np.ascontiguousarray(im[:, ::-1]) for im in images]
                outputs = self._predict_arrays(batch, conf_floor=conf_floor)
                parts.extend(_rows(batch_ids, outputs, view))
        if not parts:
            return empty_predictions()
        return pd.concat(parts, ignore_index=True)[PREDICTION_COLUMNS]

    def _checked_image(self, image: np.ndarray, image_id: str) -> np.ndarray:
        image = check_image(image, image_id)
        if self.input_shape is not None and tuple(image.shape) != self.input_shape:
            raise DataError(
                f"image {image_id}: cache image is {image.shape} but this detector was trained on {self.input_shape} "
                "images: the preprocessing differs from training"
            )
        return image

    @abc.abstractmethod
    def _predict_arrays(self, images: list[np.ndarray], *, conf_floor: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """uint8 (H, W) images -> per image (normalized xyxy (N, 4), scores (N,), 0-based classes (N,))."""

    @abc.abstractmethod
    def _to_device(self, device: torch.device) -> None: ...

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temporary name, then rename)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "img_size": self.img_size,
            "preprocess": plain_types(self.preprocess),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "history": plain_types(self.history),
            **self._state(),
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return Path(path)

    @abc.abstractmethod
    def _state(self) -> dict: ...

    @abc.abstractmethod
    def _restore(self, ckpt: dict) -> None: ...


def _rows(image_ids: list[str], outputs: list[tuple], view: str) -> list[pd.DataFrame]:
    frames = []
    for image_id, (boxes, scores, classes) in zip(image_ids, outputs):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if view == "hflip":
            boxes = hflip(boxes)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.any():
            continue
        df = pd.DataFrame(boxes[keep], columns=BOX_COLUMNS)
        df.insert(0, "class_id", np.asarray(classes, np.int64)[keep])
        df.insert(0, "image_id", image_id)
        df["score"] = np.asarray(scores, np.float32)[keep]
        df["view"] = view
        frames.append(df)
    return frames


def plain_types(obj: Any) -> Any:
    """Tensors/numpy scalars -> Python numbers, tuples -> lists: what weights_only loading accepts."""
    if isinstance(obj, dict):
        return {str(k): plain_types(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_types(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj
