"""Segmentation metrics: dice and IoU per image and over the dataset (pure numpy).

Per image, an empty prediction on an empty truth scores 1 (SIIM-ACR scored it so: a negative image
answered with an empty mask is a perfect answer), and a non-empty prediction there scores 0. That
makes the mean per-image dice depend on the empty images as much as on the drawn ones, so the
dataset-level (global) dice -- all pixels of all images as one mask -- and the mean over positive
images only are reported beside it.
"""
from __future__ import annotations

import numpy as np


def _as_bool(masks: np.ndarray) -> np.ndarray:
    arr = np.asarray(masks)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {arr.shape}")
    return arr.astype(bool)


def dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) dice of binary masks, 2|P & T| / (|P| + |T|); 1 where both are empty."""
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    inter = (p & t).sum(axis=(1, 2)).astype(np.float64)
    total = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)).astype(np.float64)
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def iou_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N,) intersection over union of binary masks; 1 where both are empty."""
    p, t = _as_bool(pred), _as_bool(truth)
    inter = (p & t).sum(axis=(1, 2)).astype(np.float64)
    union = (p | t).sum(axis=(1, 2)).astype(np.float64)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def global_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of all images' pixels as one mask (1 when everything is empty)."""
    p, t = _as_bool(pred), _as_bool(truth)
    total = float(p.sum() + t.sum())
    return 1.0 if total == 0 else 2.0 * float((p & t).sum()) / total


def segmentation_metrics(probs: np.ndarray, truth: np.ndarray, *, threshold: float) -> dict:
    """Dice and IoU (mean per image, over positive images, global) of probabilities at a threshold."""
    pred = np.asarray(probs) >= threshold
    t = _as_bool(truth)
    if not len(t):
        return {"images": 0}
    dice = dice_per_image(pred, t)
    positive = t.any(axis=(1, 2))
    return {"dice": float(dice.mean()), "iou": float(iou_per_image(pred, t).mean()),
            "dice_positive": float(dice[positive].mean()) if positive.any() else None,
            "dice_global": global_dice(pred, t), "threshold": float(threshold), "images": int(len(t)),
            "empty_images": int((~positive).sum())}
