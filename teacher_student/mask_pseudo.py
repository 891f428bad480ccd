"""Pure maths of pseudo masks and of the classification -> segmentation cascade.

Like :mod:`teacher_student.pseudo` for class labels: keyword-only functions of arrays, no I/O,
tested with hand-computed values. Probabilities are stored raw (8-bit: :func:`to_uint8`) and the
pixel threshold is applied when a student reads them.

A pseudo mask is the mean probability over the fold models x flip views that made it (the flipped
view flipped back first). Two decisions are read on out-of-fold predictions, where the truth is
known: the **pixel threshold** (foreground from this probability up, the best mean per-image dice)
and an **image confidence threshold** -- the lowest confidence whose OOF images reach a target mean
dice -- which decides which pool images become pseudo masks at all.
"""
from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

from ..loops.seg_metrics import dice_per_image

PIXEL_GRID = tuple(round(t, 2) for t in np.arange(0.2, 0.81, 0.05))
"""Pixel thresholds tried on OOF (the mean-dice optimum is flat around 0.5 for a calibrated model)."""
GATE_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
"""P(positive) thresholds the hard cascade tries on OOF (0: no image emptied)."""


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 0..255 (storage: 8 bits are finer than any threshold)."""
    return np.clip(np.rint(np.asarray(probs, np.float64) * 255.0), 0, 255).astype(np.uint8)


def from_uint8(stored: np.ndarray) -> np.ndarray:
    return np.asarray(stored, np.float32) / 255.0


def mask_confidence(probs: np.ndarray, *, pixel_threshold: float) -> np.ndarray:
    """(N,) confidence of each image's mask: the mean probability of its foreground pixels; for an
    image predicted empty, 1 - its highest probability (how sure it is that nothing is there)."""
    p = np.asarray(probs, np.float64).reshape(len(probs), -1)
    fg = p >= pixel_threshold
    inside = np.where(fg, p, 0).sum(axis=1) / np.maximum(fg.sum(axis=1), 1)
    return np.where(fg.any(axis=1), inside, 1.0 - p.max(axis=1, initial=0.0))


def model_agreement(model_probs: np.ndarray, *, pixel_threshold: float) -> np.ndarray:
    """(N,) mean pairwise dice between the binary masks of M models (M, N, H, W); empty pairs
    agree perfectly (1). One model: 1 (nothing to disagree with)."""
    masks = np.asarray(model_probs) >= pixel_threshold
    pairs = list(itertools.combinations(range(len(masks)), 2))
    if not pairs:
        return np.ones(masks.shape[1])
    return np.mean([dice_per_image(masks[a], masks[b]) for a, b in pairs], axis=0)


def best_pixel_threshold(probs: np.ndarray, truth: np.ndarray, *, grid=PIXEL_GRID) -> tuple[float, float]:
    """(threshold, mean per-image dice) of the grid threshold with the best OOF mean dice (the
    lowest among ties, so that recall is kept)."""
    if not len(probs):
        return 0.5, float("nan")
    scores = [float(dice_per_image(np.asarray(probs) >= t, truth).mean()) for t in grid]
    best = int(np.argmax(scores))
    return float(grid[best]), scores[best]


def confidence_threshold(confidence: np.ndarray, dice: np.ndarray, *, target_dice: float) -> float:
    """Lowest confidence c such that the OOF images with confidence >= c reach ``target_dice``
    mean dice; +inf when no c does (as ``pseudo.precision_threshold`` for class labels)."""
    if not 0 < target_dice <= 1:
        raise ValueError(f"target_dice must be in (0, 1], got {target_dice}")
    conf, d = np.asarray(confidence, np.float64), np.asarray(dice, np.float64)
    if conf.shape != d.shape:
        raise ValueError("confidence and dice must have the same length")
    order = np.argsort(-conf, kind="stable")
    c, mean = conf[order], np.cumsum(d[order]) / np.arange(1, len(d) + 1)
    last = np.r_[c[1:] != c[:-1], True] if len(c) else np.zeros(0, bool)  # one point per distinct confidence
    ok = c[last][mean[last] >= target_dice - 1e-12]
    return float(ok.min()) if len(ok) else float("inf")


IGNORED = -1.0
"""Target value of a pixel left out of the loss (``loops.seg_loss`` skips targets below 0)."""


def pseudo_target(stored: np.ndarray, *, pixel_threshold: float, mode: Literal["hard", "soft"],
                  pixel_confidence: float = 0.0) -> np.ndarray:
    """What a student learns from a stored (uint8) pseudo mask: 0/1 at the threshold, or the probability.

    ``pixel_confidence`` > 0 (hard mode): pixels whose probability is neither >= it nor <= 1 - it
    are IGNORED -- the teacher's uncertain band, mostly its boundaries, is where its errors are,
    so the student learns boundaries from the labeled images only (the per-pixel confidence mask of
    semi-supervised segmentation, as FixMatch-style methods cut uncertain pixels)."""
    p = from_uint8(stored)
    if mode == "soft":
        return p
    if mode != "hard":
        raise ValueError(f"pseudo mask mode must be 'hard' or 'soft', got {mode!r}")
    target = (p >= pixel_threshold).astype(np.float32)
    if pixel_confidence > 0:
        target[(p < pixel_confidence) & (p > 1 - pixel_confidence)] = IGNORED
    return target


# ----------------------------------------------------------------------------- the cascade


def gate_masks(probs: np.ndarray, p_positive: np.ndarray, *, mode: Literal["hard", "soft", "off"],
               threshold: float) -> np.ndarray:
    """Mask probabilities after the classifier's gate (SIIM-ACR's cascade).

    hard: an image whose P(positive) is below ``threshold`` gets an all-zero (empty) mask, the
    others stand; soft: every pixel probability times P(positive); off: unchanged.
    """
    probs = np.asarray(probs, np.float32)
    p = np.asarray(p_positive, np.float32).reshape(-1, *([1] * (probs.ndim - 1)))
    if len(p) != len(probs):
        raise ValueError(f"{len(probs)} masks but {len(p)} P(positive) values")
    if mode == "off":
        return probs
    if mode == "soft":
        return probs * p
    if mode == "hard":
        return np.where(p >= threshold, probs, 0.0).astype(np.float32)
    raise ValueError(f"cascade mode must be hard, soft or off, got {mode!r}")


def tune_cascade(probs: np.ndarray, truth: np.ndarray, p_positive: np.ndarray, *,
                 mode: Literal["hard", "soft", "off"], pixel_grid=PIXEL_GRID, gate_grid=GATE_GRID) -> dict:
    """The (gate threshold, pixel threshold) pair with the best OOF mean dice, empty images
    included; also the ungated best, for comparison. Soft and off modes have no gate threshold."""
    grid = gate_grid if mode == "hard" else (0.0,)
    best = {"dice": -1.0}
    for g in grid:
        gated = gate_masks(probs, p_positive, mode=mode, threshold=g)
        for t in pixel_grid:
            dice = float(dice_per_image(gated >= t, truth).mean())
            if dice > best["dice"] + 1e-12:
                best = {"dice": dice, "threshold": float(g), "pixel_threshold": float(t)}
    ungated_t, ungated = best_pixel_threshold(probs, truth, grid=pixel_grid)
    return {**best, "ungated_dice": ungated, "ungated_pixel_threshold": ungated_t}
