"""The pseudo-mask maths and the cascade gate, with values worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_noisy_student.loops.seg_metrics import dice_per_image, global_dice, iou_per_image, segmentation_metrics
from cxr_noisy_student.teacher_student import mask_pseudo as mp


def masks(*rows) -> np.ndarray:
    """1 x 4 masks from lists, stacked: masks([1,1,0,0], [0,0,0,0]) -> (2, 1, 4)."""
    return np.array([[r] for r in rows], dtype=float)


def test_dice_and_iou_per_image_with_empty_vs_empty_one():
    pred = masks([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    truth = masks([1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0])
    assert dice_per_image(pred, truth).tolist() == [2 * 1 / 3, 1.0, 0.0, 0.0]
    assert iou_per_image(pred, truth).tolist() == [0.5, 1.0, 0.0, 0.0]
    assert global_dice(pred, truth) == pytest.approx(2 * 1 / (3 + 2))
    m = segmentation_metrics(pred * 0.8, truth, threshold=0.5)
    assert m["dice"] == pytest.approx((2 / 3 + 1) / 4) and m["empty_images"] == 2
    assert m["dice_positive"] == pytest.approx((2 / 3 + 0) / 2)


def test_storage_is_eight_bit_and_reads_back_within_half_a_step():
    p = np.array([0.0, 0.5, 0.999, 1.0])
    assert mp.to_uint8(p).tolist() == [0, 128, 255, 255]
    assert np.abs(mp.from_uint8(mp.to_uint8(p)) - p).max() <= 0.5 / 255 + 1e-7


def test_mask_confidence_inside_the_mask_or_of_an_empty_answer():
    probs = masks([0.9, 0.7, 0.2, 0.0], [0.1, 0.3, 0.0, 0.0])
    # image 0: pixels >= 0.5 are 0.9, 0.7 -> mean 0.8; image 1: empty, 1 - max 0.3 = 0.7
    assert mp.mask_confidence(probs, pixel_threshold=0.5) == pytest.approx([0.8, 0.7])


def test_model_agreement_is_the_mean_pairwise_dice():
    a = masks([1, 1, 0, 0], [0, 0, 0, 0])
    b = masks([1, 0, 0, 0], [0, 0, 0, 0])
    c = masks([1, 1, 0, 0], [1, 0, 0, 0])
    # image 0: dice(a,b) 2/3, dice(a,c) 1, dice(b,c) 2/3 -> 7/9; image 1: 1, 0, 0 -> 1/3
    got = mp.model_agreement(np.stack([a, b, c]), pixel_threshold=0.5)
    assert got == pytest.approx([7 / 9, 1 / 3])
    assert mp.model_agreement(np.stack([a]), pixel_threshold=0.5).tolist() == [1.0, 1.0]


def test_best_pixel_threshold_on_oof():
    probs = masks([0.9, 0.6, 0.4, 0.1])
    truth = masks([1, 1, 0, 0])
    # 0.3: {0,1,2} dice 0.8; 0.5: {0,1} dice 1; 0.7: {0} dice 2/3
    assert mp.best_pixel_threshold(probs, truth, grid=(0.3, 0.5, 0.7)) == (0.5, pytest.approx(1.0))


def test_confidence_threshold_is_the_lowest_reaching_the_target_mean_dice():
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    dice = np.array([1.0, 0.9, 0.5, 0.9, 0.2])
    # running means from the top: 1.0, 0.95, 0.8, 0.825, 0.7
    assert mp.confidence_threshold(conf, dice, target_dice=0.8) == pytest.approx(0.7)
    assert mp.confidence_threshold(conf, dice, target_dice=0.9) == pytest.approx(0.9)
    assert mp.confidence_threshold(conf, dice, target_dice=1.0) == pytest.approx(0.95)
    assert np.isinf(mp.confidence_threshold(conf, dice * 0.5, target_dice=0.9))
    # ties: one point per distinct confidence (0.9 and 0.9 enter together: mean 0.5, never 1.0 alone)
    assert np.isinf(mp.confidence_threshold(np.array([0.9, 0.9]), np.array([1.0, 0.0]), target_dice=0.9))
    with pytest.raises(ValueError):
        mp.confidence_threshold(conf, dice, target_dice=0)


def test_pseudo_target_is_thresholded_when_read_or_kept_soft():
    stored = mp.to_uint8(np.array([[0.2, 0.6]]))
    assert mp.pseudo_target(stored, pixel_threshold=0.5, mode="hard").tolist() == [[0.0, 1.0]]
    assert mp.pseudo_target(stored, pixel_threshold=0.5, mode="soft")[0] == pytest.approx([51 / 255, 153 / 255])


def test_pseudo_target_leaves_the_uncertain_band_out_and_the_loss_skips_it():
    import torch

    from cxr_noisy_student.loops.seg_loss import segmentation_loss

    stored = mp.to_uint8(np.array([[0.05, 0.3, 0.6, 0.95]]))
    target = mp.pseudo_target(stored, pixel_threshold=0.5, mode="hard", pixel_confidence=0.9)
    assert target.tolist() == [[0.0, mp.IGNORED, mp.IGNORED, 1.0]]
    # the loss of a 4-pixel image with two ignored pixels is the loss of its two certain pixels alone
    logits = torch.tensor([[[[0.0, 3.0, -3.0, 2.0]]]])
    full = segmentation_loss(logits, torch.from_numpy(target)[None, None], torch.ones(1))
    kept = segmentation_loss(logits[..., [0, 3]], torch.tensor([[[[0.0, 1.0]]]]), torch.ones(1))
    assert float(full["loss"]) == pytest.approx(float(kept["loss"]))
    # by hand: BCE mean of (log 2, log(1 + e^-2)); dice 1 - (2 x 0.881 + 1) / (0.5 + 0.881 + 1 + 1)
    p0, p3 = 0.5, 1 / (1 + np.exp(-2.0))
    bce = (np.log(2) + np.log(1 + np.exp(-2.0))) / 2
    dice = 1 - (2 * p3 + 1) / (p0 + p3 + 1 + 1)
    assert float(full["loss"]) == pytest.approx(bce + dice, rel=1e-5)


def test_gate_masks_hard_soft_off():
    probs = masks([0.9, 0.8, 0, 0], [0.6, 0, 0, 0])
    p_pos = np.array([0.3, 0.7])
    hard = mp.gate_masks(probs, p_pos, mode="hard", threshold=0.5)
    assert hard[0].sum() == 0 and hard[1] == pytest.approx(probs[1])  # below the gate: an empty mask
    soft = mp.gate_masks(probs, p_pos, mode="soft", threshold=0.5)
    assert soft[0, 0, :2] == pytest.approx([0.27, 0.24]) and soft[1, 0, 0] == pytest.approx(0.42)
    assert mp.gate_masks(probs, p_pos, mode="off", threshold=0.5) == pytest.approx(probs)


def test_tune_cascade_counts_empty_images_and_beats_the_ungated_mask():
    # image 0 truly empty but the segmenter draws a pixel; image 1 positive and well drawn
    probs = masks([0.9, 0, 0, 0], [0.9, 0.9, 0, 0])
    truth = masks([0, 0, 0, 0], [1, 1, 0, 0])
    p_pos = np.array([0.1, 0.8])
    best = mp.tune_cascade(probs, truth, p_pos, mode="hard", pixel_grid=(0.5,), gate_grid=(0.0, 0.5, 0.9))
    # gate 0: dice (0 + 1) / 2 = 0.5; gate 0.5: image 0 emptied -> (1 + 1) / 2 = 1; gate 0.9: (1 + 0) / 2
    assert best["threshold"] == 0.5 and best["dice"] == pytest.approx(1.0)
    assert best["ungated_dice"] == pytest.approx(0.5)
    soft = mp.tune_cascade(probs, truth, p_pos, mode="soft", pixel_grid=(0.5,))
    # soft: image 0 -> 0.09 (< 0.5: empty), image 1 -> 0.72 (kept): dice 1
    assert soft["dice"] == pytest.approx(1.0) and soft["threshold"] == 0.0
