"""The one box convention of the engine, and conversions at its edges.

Inside the engine a box is normalized ``x_min, y_min, x_max, y_max`` in [0, 1], float32, with a
0-based class id. Images are resized to a square without keeping the aspect ratio, so normalized
boxes are the same at every resolution; conversions happen only where another library or file
format needs its own convention (YOLO cx,cy,w,h; effdet pixel y,x,y,x with classes from 1;
submission pixels), and every one is tested as a round trip.
"""
from __future__ import annotations

import numpy as np

BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]


def as_boxes(boxes) -> np.ndarray:
    """An (N, 4) float32 array from anything array-like (an empty input gives shape (0, 4))."""
    arr = np.asarray(boxes, dtype=np.float32)
    return arr.reshape(-1, 4)


def box_problem(x_min: float, y_min: float, x_max: float, y_max: float, tol: float = 1e-6) -> str | None:
    """Why a normalized box is invalid, or None when it is fine. Used by every validator."""
    values = (x_min, y_min, x_max, y_max)
    if any(v is None or not np.isfinite(v) for v in values):
        return f"box has a missing/NaN coordinate {values}"
    if min(values) < -tol or max(values) > 1 + tol:
        return f"box {tuple(round(float(v), 4) for v in values)} lies outside the image"
    if x_max < x_min or y_max < y_min:
        return f"box is inverted (x_max < x_min or y_max < y_min): {values}"
    if x_max - x_min <= tol or y_max - y_min <= tol:
        return f"box has zero area: {values}"
    return None


def to_pixels(boxes, width: float, height: float) -> np.ndarray:
    return as_boxes(boxes) * np.array([width, height, width, height], dtype=np.float32)


def from_pixels(boxes, width: float, height: float) -> np.ndarray:
    return as_boxes(boxes) / np.array([width, height, width, height], dtype=np.float32)


def to_yolo(boxes) -> np.ndarray:
    """Normalized xyxy -> normalized cx, cy, w, h (YOLO label files)."""
    b = as_boxes(boxes)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def from_yolo(boxes) -> np.ndarray:
    b = as_boxes(boxes)
    half_w, half_h = b[:, 2] / 2, b[:, 3] / 2
    return np.stack([b[:, 0] - half_w, b[:, 1] - half_h, b[:, 0] + half_w, b[:, 1] + half_h], axis=1)


def to_effdet(boxes, size: int) -> np.ndarray:
    """Normalized xyxy -> effdet training targets: pixel y_min, x_min, y_max, x_max."""
    b = to_pixels(boxes, size, size)
    return b[:, [1, 0, 3, 2]]


def from_effdet_prediction(boxes, size: int) -> np.ndarray:
    """effdet DetBenchPredict output (pixel x_min, y_min, x_max, y_max) -> normalized xyxy, clipped."""
    return np.clip(from_pixels(boxes, size, size), 0.0, 1.0)


def to_coco(boxes, width: float, height: float) -> np.ndarray:
    """Normalized xyxy -> COCO pixel x, y, w, h."""
    b = to_pixels(boxes, width, height)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def from_coco(boxes, width: float, height: float) -> np.ndarray:
    b = as_boxes(boxes)
    xyxy = np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)
    return from_pixels(xyxy, width, height)


def hflip(boxes) -> np.ndarray:
    """Boxes of the horizontally flipped image (used to undo flip TTA)."""
    b = as_boxes(boxes)
    return np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], axis=1)


def iou_matrix(a, b) -> np.ndarray:
    """Pairwise IoU of two sets of xyxy boxes, shape (len(a), len(b))."""
    a, b = as_boxes(a).astype(np.float64), as_boxes(b).astype(np.float64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)
