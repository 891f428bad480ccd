"""CutMix for dense targets: a rectangle of another image of the batch, with its mask.

Why: self-training for segmentation gains little from pseudo masks that a student sees under the
same mild noise the teacher answered them under -- it learns the teacher's boundaries back. The
semi-supervised segmentation literature found one perturbation that breaks this: mixing images
(French et al. 2020, "Semi-supervised semantic segmentation needs strong, varied perturbations";
Yang et al. 2022, ST++, where CutMix is the strongest of the "strong data augmentations"). The
student must draw the lung of film A next to a pasted patch of film B, a context the teacher never
answered in. Batch-level (a partner from the same batch), after the per-image transform, so the
pasted patch carries its own mask pixels exactly.

Pure tensor maths with an explicit generator: no hidden randomness, testable by hand.
"""
from __future__ import annotations

import math

import torch


def cutmix_boxes(n: int, height: int, width: int, *, prob: float, area: tuple[float, float],
                 generator: torch.Generator) -> list[tuple[int, int, int, int, int] | None]:
    """Per sample, None (left alone) or (partner, y0, y1, x0, x1): the rectangle pasted from the
    partner. The rectangle covers a fraction of the image drawn uniformly in ``area``, with the
    image's aspect ratio, at a uniform position inside the image; the partner is another sample."""
    if n < 2 or prob <= 0:
        return [None] * n
    lo, hi = area
    draws = torch.rand(n, 4, generator=generator)
    partners = torch.randint(1, n, (n,), generator=generator)
    out: list[tuple[int, int, int, int, int] | None] = []
    for i in range(n):
        if float(draws[i, 0]) >= prob:
            out.append(None)
            continue
        side = math.sqrt(lo + (hi - lo) * float(draws[i, 1]))
        h, w = max(1, round(height * side)), max(1, round(width * side))
        y0, x0 = int(float(draws[i, 2]) * (height - h + 1)), int(float(draws[i, 3]) * (width - w + 1))
        out.append(((i + int(partners[i])) % n, y0, y0 + h, x0, x0 + w))
    return out


def cutmix_batch(images: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor, *, prob: float,
                 generator: torch.Generator, area: tuple[float, float] = (0.25, 0.5)
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CutMix of (N, C, H, W) images and (N, 1, H, W) masks: each sample, with probability
    ``prob``, gets a rectangle of another sample pasted in, image and mask alike. Its loss weight
    becomes the area-weighted mean of the two samples' weights (a pseudo-masked patch in a
    labeled film counts as much as pseudo pixels do). Returns new tensors; the inputs are kept."""
    n, _, height, width = images.shape
    return paste_boxes(images, masks, weights, cutmix_boxes(n, height, width, prob=prob, area=area,
                                                            generator=generator))


def paste_boxes(images: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor,
                boxes: list[tuple[int, int, int, int, int] | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste per sample i the rectangle ``boxes[i] = (partner, y0, y1, x0, x1)`` of the partner's
    image and mask (None: sample left alone); weights become area-weighted means. New tensors."""
    if all(b is None for b in boxes):
        return images, masks, weights
    height, width = images.shape[-2:]
    out_x, out_m, out_w = images.clone(), masks.clone(), weights.clone().float()
    for i, box in enumerate(boxes):
        if box is None:
            continue
        j, y0, y1, x0, x1 = box
        out_x[i, :, y0:y1, x0:x1] = images[j, :, y0:y1, x0:x1]
        out_m[i, :, y0:y1, x0:x1] = masks[j, :, y0:y1, x0:x1]
        share = (y1 - y0) * (x1 - x0) / (height * width)
        out_w[i] = (1 - share) * float(weights[i]) + share * float(weights[j])
    return out_x, out_m, out_w
