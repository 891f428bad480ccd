"""The torch dataset of segmentation: cached images with a target mask per sample.

Targets are float maps in [0, 1] of the cached image's size: ground-truth masks (0/1 from the mask
cache) or pseudo masks (the teacher's stored probabilities, thresholded or kept soft when the
student reads them, as class pseudo labels are). The image and its target go through one
albumentations call, so every geometric op moves both.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from .torch_data import check_image, to_tensor

TargetOf = Callable[[int], np.ndarray]
"""Sample index -> float32 (H, W) target in [0, 1]."""


class SegmentationDataset(Dataset):
    """Images with mask targets and per-sample loss weights.

    Args:
        load: image_id -> uint8 (size, size) image (``ImageCache.load``).
        image_ids: one entry per sample.
        target_of: sample index -> float32 (size, size) target; None: zeros (prediction only).
        weights: (N,) loss weights (pseudo masks may weigh less); None: ones.
        transform: a mask-aware albumentations transform or None.
        mean, std: normalisation, as the checkpoint says.
    """

    def __init__(self, load: Callable[[str], np.ndarray], image_ids, target_of: TargetOf | None, weights, transform,
                 mean: float, std: float):
        self.load, self.image_ids, self.target_of = load, [str(i) for i in image_ids], target_of
        n = len(self.image_ids)
        self.weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32).reshape(-1)
        if len(self.weights) != n:
            raise ValueError(f"weights must have N={n} entries, got {len(self.weights)}")
        self.transform, self.mean, self.std = transform, float(mean), float(std)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        image = check_image(self.load(image_id), image_id)
        target = (np.zeros(image.shape[:2], np.float32) if self.target_of is None
                  else np.asarray(self.target_of(index), np.float32))
        if target.shape != image.shape[:2]:
            raise ValueError(f"image {image_id}: target mask {target.shape} does not match the image {image.shape[:2]}")
        if self.transform is not None:
            out = self.transform(image=image, mask=target)
            image, target = out["image"], out["mask"]
        return {"image": to_tensor(image, self.mean, self.std), "mask": np.ascontiguousarray(target, np.float32)[None],
                "weight": self.weights[index], "index": index}

    def reseed(self, seed: int) -> None:
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)
