"""Torch datasets over the preprocessing cache.

Images come from a ``load(image_id) -> uint8 (size, size)`` callable (``ImageCache.load``), so a
dataset holds no pixels and forks cheaply into DataLoader workers. Augmentation runs on uint8 (fast
in OpenCV); the one conversion to float, ``x / 255`` then ``(x - mean) / std``, happens last.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError


def to_tensor(image: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 1) -> float32 (1, H, W), normalized as the checkpoint says."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
    x = x.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # == (x / 255 - mean) / std, in two passes
    return x.reshape(1, *x.shape[:2])


def check_image(image: object, image_id: str) -> np.ndarray:
    """The cache's contract (2-D uint8, or H x W x 1), checked cheaply for every item."""
    ok = isinstance(image, np.ndarray) and image.dtype == np.uint8
    if not (ok and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1))):
        what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"image {image_id}: loader returned {what}, expected a uint8 (H, W) array")
    return image


class ClassificationDataset(Dataset):
    """Images with (soft) targets and per-sample loss weights.

    Args:
        load: image_id -> uint8 (size, size) array.
        image_ids: one entry per sample; an id may repeat (balanced pseudo labels are duplicated).
        targets: (N, C) float32 targets: one-hot, multi-hot or soft probabilities.
        weights: (N,) float32 loss weights (pseudo labels weigh less); None means all ones.
        transform: an albumentations-style callable ``transform(image=...)["image"]`` or None.
        mean: normalization mean on the [0, 1] scale (``PreprocessConfig.mean``; no default, so
            that a caller cannot silently normalize differently from the checkpoint).
        std: normalization std on the [0, 1] scale.

    Items are dicts: image (1, H, W) float32 tensor, target (C,) float32 array, weight float32,
    index int; a DataLoader batch holds tensors of all four.
    """

    def __init__(self, load: Callable[[str], np.ndarray], image_ids, targets, weights, transform, mean: float, std: float,
                 mask_of: Callable[[int], np.ndarray | None] | None = None):
        self.load, self.mask_of = load, mask_of
        self.image_ids = [str(i) for i in image_ids]
        self.targets = np.asarray(targets, dtype=np.float32)
        n = len(self.image_ids)
        self.weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, dtype=np.float32).reshape(-1)
        self.transform = transform
        self.mean, self.std = float(mean), float(std)
        if self.targets.ndim != 2 or len(self.targets) != n:
            raise ValueError(f"targets must be (N={n}, C), got shape {self.targets.shape}")
        if len(self.weights) != n:
            raise ValueError(f"weights must have N={n} entries, got {len(self.weights)}")
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        bad = np.flatnonzero(~np.isfinite(self.targets).all(axis=1))
        if len(bad):
            raise DataError(f"image {self.image_ids[bad[0]]}: target has NaN/inf ({len(bad)} such rows); "
                            "unlabeled images need pseudo targets first")

    @property
    def num_classes(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        image = check_image(self.load(image_id), image_id)
        if self.mask_of is not None:
            return self._with_mask(index, image)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        # numpy scalars/rows rather than tiny tensors: default_collate batches them into tensors
        # for a third of the per-item cost (it shows at small image sizes)
        return {"image": to_tensor(image, self.mean, self.std), "target": self.targets[index], "weight": self.weights[index], "index": index}

    def _with_mask(self, index: int, image: np.ndarray) -> dict:
        """An item with an auxiliary mask target (``mask_of``): moved by the same transform; an
        image without a mask gets zeros and ``mask_weight`` 0."""
        mask = self.mask_of(index)
        weight = np.float32(mask is not None)
        mask = np.zeros(image.shape[:2], np.uint8) if mask is None else np.asarray(mask, np.uint8)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {"image": to_tensor(image, self.mean, self.std), "target": self.targets[index],
                "weight": self.weights[index], "index": index, "mask": mask[None].astype(np.float32),
                "mask_weight": weight}

    def reseed(self, seed: int) -> None:
        """Seed the transform's own generator (albumentations 2 ignores numpy's global seed)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % 2**32)
