"""The dense loss: per-image BCE + soft dice, weighted per sample (see ``loops.segment`` for why both)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, *,
                      dice_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-sample BCE (mean over pixels) + dice_weight x soft dice loss, weighted mean over the batch.

    Pixels whose target is negative (a pseudo mask's uncertain band, ``mask_pseudo.IGNORED``) are
    left out of both: BCE is the mean over the other pixels, dice is computed on them alone."""
    logits, target = logits.float().flatten(1), target.float().flatten(1)
    valid = (target >= 0).float()
    target = target.clamp(min=0)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum(dim=1)
    bce = bce / valid.sum(dim=1).clamp(min=1)
    prob = logits.sigmoid() * valid
    dice = 1 - (2 * (prob * target).sum(dim=1) + SMOOTH) / (prob.sum(dim=1) + target.sum(dim=1) + SMOOTH)
    w = weights.float()
    return {"loss": ((bce + dice_weight * dice) * w).mean(), "bce": (bce * w).mean(), "dice_loss": (dice * w).mean()}
