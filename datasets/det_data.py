"""The torch dataset of the effdet detector path: cached uint8 images + engine boxes -> effdet targets.

Why a separate dataset for effdet (YOLO reads its own export): effdet wants pixel ``y_min, x_min,
y_max, x_max`` boxes with classes from 1, padded to a fixed number of rows with -1 so a batch stacks;
the conversion happens here, at the edge, through ``datasets.boxes.to_effdet``. An image with no
boxes yields an all -1 target, which effdet's anchor labeler filters to "no positives" (background
only), so negatives train the classifier head too.

Channels: effdet backbones (timm EfficientNets) expect 3 channels; the gray image is repeated, which
keeps ImageNet-pretrained backbones usable for users who opt into pretrained weights.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .boxes import BOX_COLUMNS, box_problem, to_effdet
from . import torch_data
from .errors import DataError
from .torch_data import to_tensor


def image_tensor(image: np.ndarray, *, size: int, mean: float, std: float) -> torch.Tensor:
    """uint8 (H, W) -> float32 (3, size, size): resize, ``(x / 255 - mean) / std``, gray repeated."""
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return to_tensor(image, mean, std).repeat(3, 1, 1)


def check_image(image: np.ndarray, image_id: str) -> np.ndarray:
    """The cache contract (``datasets.torch_data.check_image``), returned as a 2-D array."""
    image = torch_data.check_image(image, image_id)
    return image.reshape(image.shape[:2])


def boxes_by_image(boxes_df: pd.DataFrame | None, image_ids: Sequence[str], num_classes: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image_id -> (normalized xyxy float32 (N, 4), 0-based class int64 (N,)); validated once."""
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    out = {str(i): empty for i in image_ids}
    if boxes_df is None or boxes_df.empty:
        return out
    df = boxes_df[boxes_df["image_id"].astype(str).isin(out)]
    coords = df[BOX_COLUMNS].to_numpy(dtype=np.float32)
    bad = ~(np.isfinite(coords).all(1) & (coords >= 0).all(1) & (coords <= 1).all(1)
            & (coords[:, 2] > coords[:, 0]) & (coords[:, 3] > coords[:, 1]))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problem = box_problem(*(float(v) for v in coords[row]), tol=0.0)
        raise DataError(f"boxes, row {df.index[row]} (image {df['image_id'].iloc[row]}): {problem}")
    classes = df["class_id"].to_numpy(dtype=np.float64)  # an object column (an empty table's, concatenated) too
    bad = (classes < 0) | (classes != np.round(classes)) | (classes >= (num_classes if num_classes else np.inf))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        limit = f"0..{num_classes - 1}" if num_classes else "a non-negative integer"
        raise DataError(f"boxes, row {df.index[row]} (image {df['image_id'].iloc[row]}): class_id {classes[row]:g} is not {limit}")
    for image_id, group in df.groupby(df["image_id"].astype(str), sort=False):
        out[image_id] = (group[BOX_COLUMNS].to_numpy(np.float32), group["class_id"].to_numpy(np.int64))
    return out


class DetectionDataset(Dataset):
    """(image (3, S, S) float32, target) pairs for effdet's DetBenchTrain.

    target: ``bbox`` (max_boxes, 4) pixel y_min, x_min, y_max, x_max; ``cls`` (max_boxes,) classes
    from 1; both padded with -1. ``img_scale`` (1.0) and ``img_size`` ((S, S)) let the bench run in
    eval mode (validation loss) too.

    Args:
        load: image_id -> uint8 (H, W) from the preprocessing cache.
        image_ids: Images, in order.
        boxes_df: Engine boxes (image_id, class_id, x_min, y_min, x_max, y_max); None: no targets.
        transform: An albumentations Compose with ``BboxParams(format="albumentations")`` and one
            label field (whatever its name), e.g. ``augment.transforms.detection_transform``; it
            must return size x size images. None: resize only.
        mean, std: Normalization after ``x / 255`` (``PreprocessConfig.mean/std``).
        size: Model input size; default: the size of the first image.
        max_boxes: Rows per target; default: the most boxes any image has (never truncates).
        num_classes: If given, class ids must lie in 0..num_classes-1.
    """

    def __init__(
        self,
        load: Callable[[str], np.ndarray],
        image_ids: Sequence[str],
        boxes_df: pd.DataFrame | None,
        transform=None,
        mean: float = 0.5,
        std: float = 0.25,
        *,
        size: int | None = None,
        max_boxes: int | None = None,
        num_classes: int | None = None,
    ):
        self.load, self.image_ids = load, [str(i) for i in image_ids]
        self.transform, self.mean, self.std = transform, float(mean), float(std)
        self.boxes = boxes_by_image(boxes_df, self.image_ids, num_classes)
        most = max((len(c) for _, c in self.boxes.values()), default=0)
        if max_boxes is not None and max_boxes < most:
            raise ValueError(f"max_boxes={max_boxes} but an image has {most} boxes; they would be dropped")
        self.max_boxes = max(1, most if max_boxes is None else max_boxes)
        self.size = size
        self.label_field = _label_field(transform)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        image = check_image(self.load(image_id), image_id)
        size = self.size or image.shape[0]
        if image.shape != (size, size):
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        boxes, classes = self.boxes[image_id]
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, **{self.label_field: classes})
            image, boxes = out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            classes = np.asarray(out[self.label_field], np.int64)
            if image.shape[:2] != (size, size):
                raise ValueError(f"transform returned a {image.shape[:2]} image for size {size}: it must keep the size")
        x = image_tensor(image, size=size, mean=self.mean, std=self.std)
        return x, self._target(boxes, classes, size)

    def _target(self, boxes: np.ndarray, classes: np.ndarray, size: int) -> dict[str, torch.Tensor]:
        bbox = torch.full((self.max_boxes, 4), -1.0)
        cls = torch.full((self.max_boxes,), -1.0)
        if len(boxes):
            bbox[: len(boxes)] = torch.from_numpy(to_effdet(boxes, size))
            cls[: len(boxes)] = torch.from_numpy(classes.astype(np.float32) + 1.0)
        return {"bbox": bbox, "cls": cls, "img_scale": torch.tensor(1.0), "img_size": torch.tensor([size, size], dtype=torch.float32)}


def _label_field(transform) -> str:
    """The label field name of an albumentations Compose with bbox params ("labels" if none)."""
    processor = getattr(transform, "processors", {}).get("bboxes") if transform is not None else None
    if transform is not None and processor is None:
        raise ValueError("the detection transform has no bbox_params: boxes would not follow the image")
    if processor is not None and processor.params.format != "albumentations":
        raise ValueError(f"the detection transform uses bbox format {processor.params.format!r}; use 'albumentations'")
    fields = list(processor.params.label_fields or []) if processor is not None else []
    if processor is not None and len(fields) != 1:
        raise ValueError(f"the detection transform needs exactly one bbox label field, has {fields}")
    return fields[0] if fields else "labels"
