"""The gains the engine reports are read against named baselines, and say so when they mean nothing."""
from __future__ import annotations

import pytest

from cxr_noisy_student.teacher_student.cycle.references import gains
from cxr_noisy_student.teacher_student.summary import format_summary


def gen(auc, map_=None):
    rec = {"classifier": {"test": {"auc_macro": auc}}}
    if map_ is not None:
        rec["detector"] = {"test": {"map": map_}}
    return rec


def test_gains_name_every_baseline():
    g = gains([gen(0.70, 0.30), gen(0.78, 0.36)], gen(0.74, 0.31), gen(0.86, 0.50))
    auc = g["classifier_auc"]
    assert auc["student_minus_ablation"] == pytest.approx(0.04)
    assert auc["student_minus_teacher"] == pytest.approx(0.08)
    assert auc["gap_closed"] == pytest.approx(0.08 / 0.16)
    assert g["detector_map"]["gap_closed"] == pytest.approx(0.06 / 0.20)


def test_gap_closed_is_undefined_with_its_reason_when_the_oracle_is_no_ceiling():
    g = gains([gen(0.80), gen(0.82)], gen(0.79), gen(0.78))
    assert g["classifier_auc"]["gap_closed"].startswith("undefined: the oracle (0.780) does not beat the teacher")
    no_oracle = gains([gen(0.80), gen(0.82)], None, None)["classifier_auc"]
    assert no_oracle["gap_closed"].startswith("undefined: no oracle") and no_oracle["student_minus_ablation"] is None


def test_the_final_table_shows_references_and_gains():
    summary = {"generations": [{"generation": 0, "model": "t", **gen(0.7)}, {"generation": 1, "model": "s", **gen(0.8)}],
               "ablation": {"classifier_model": "s", **gen(0.75)}, "oracle": {"classifier_model": "s", **gen(0.9)},
               "gains": gains([gen(0.7), gen(0.8)], gen(0.75), gen(0.9)), "wall_seconds": 3}
    text = format_summary(summary)
    assert " abl " in text and " orc " in text
    assert "student - ablation +0.050" in text and "gap closed 0.50" in text


def test_a_segmenter_only_table_has_no_classifier_or_detector_rows():
    masks = lambda dice: {"segmenter": {"oof": {"dice": dice}, "test": {"dice": dice, "iou": dice - 0.1}}}
    summary = {"generations": [{"generation": 0, "segmenter_model": "Unet:t", **masks(0.90)},
                               {"generation": 1, "segmenter_model": "Unet:t", **masks(0.92)}],
               "ablation": {"segmenter_model": "Unet:t", **masks(0.91)}, "wall_seconds": 3}
    text = format_summary(summary)
    assert "AUC oof" not in text and "mAP test" not in text
    assert "dice test" in text and " abl " in text and "0.920" in text
