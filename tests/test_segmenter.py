"""Segmentation as a task kind, end to end on a tiny real run (demo masks, real smp + timm models).

One run through the command line: classifier (with the auxiliary mask loss) + segmenter, one
cycle, ablation and oracle. Checked from its files: mask dice per generation and per reference,
the per-fold lineage of pseudo masks (and the guard refusing the ensemble's), the cascade and its
submissions, the exports (pycocotools decodes the COCO masks to the PNGs' pixels), the report.
"""
from __future__ import annotations

import html as htmllib
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.mask_export import read_coco_masks
from cxr_noisy_student.datasets.masks import rle_decode
from cxr_noisy_student.teacher_student.layout import fold_of_model
from tiny_run import make_tiny_demo, run_cli, write_config

SEG = {"ladder": ["Unet:tu-test_efficientnet"], "decoder_channels": [16, 16, 8, 8, 8],
       "train": {"epochs": 1, "batch_size": 8}, "fallback_k": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("segmenter")
    data = make_tiny_demo(base / "demo")
    config = write_config(base / "seg.yaml", data, segmenter=SEG,
                          classifier={"ladder": ["test_efficientnet"], "train": {"epochs": 1, "batch_size": 16},
                                      "aux_mask": "masks"},
                          run={"cycles": 1, "oracle": True, "ablation": True, "workers": 0,
                               "tasks": ["classifier", "segmenter"]})
    result = run_cli("--config", str(config), "--out", str(base / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"


def test_mask_dice_is_reported_per_generation_and_reference(run):
    summary = json.loads((run / "summary.json").read_text())
    for rec in (*summary["generations"], summary["ablation"], summary["oracle"]):
        seg = rec["segmenter"]
        assert 0 <= seg["oof"]["dice"] <= 1 and 0 <= seg["test"]["dice"] <= 1 and seg["test"]["images"] == 8
    assert "unlabeled_truth" in summary["generations"][0]["segmenter"]  # hidden truth measures the pool
    assert "student_minus_ablation" in summary["gains"]["segmenter_dice"]
    assert summary["cycles"][0]["pseudo"]["segmenter"]["students"]["total"] >= 0


def test_student_fold_k_learns_pseudo_masks_only_from_teacher_fold_k(run):
    folds = pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    for k in (0, 1):
        where = run / "cycle1" / "pseudo" / f"fold{k}"
        rows = pd.read_csv(where / "mask_pseudo.csv", dtype={"models": str})
        assert {fold_of_model(m) for tags in rows["models"] for m in tags.split(";")} == {k}
        info = json.loads((where / "mask_pseudo.json").read_text())
        assert info["threshold_oof_folds"] == [1 - k]
        teacher = set((run / "gen0" / "segmenter" / f"fold{k}" / "train_ids.txt").read_text().split())
        assert not teacher & set(folds.index[folds == k])
        student = set((run / "gen1" / "segmenter" / f"fold{k}" / "train_ids.txt").read_text().split())
        assert set(rows.loc[rows["kept"], "image_id"]) <= student  # the kept pseudo masks were trained on


def test_the_guard_refuses_the_ensembles_pseudo_masks(run, tmp_path):
    from cxr_noisy_student.teacher_student.tasks.base import assert_fold_lineage

    ensemble = pd.read_csv(run / "cycle1" / "pseudo" / "mask_pseudo.csv", dtype={"models": str})
    with pytest.raises(DataError, match="leak"):
        assert_fold_lineage(0, ensemble["models"], [1], where=tmp_path)


def test_cascade_writes_gated_masks_and_siim_acr_submissions(run):
    cascade = json.loads((run / "cascade" / "cascade.json").read_text())
    assert cascade["mode"] == "hard" and cascade["tuned"] and cascade["test"]["images"] == 8
    assert cascade["oof"]["gated"] >= cascade["oof"]["ungated"] - 1e-9  # tuned on OOF: never worse there
    sub = pd.read_csv(run / "cascade" / "mask_submission_gated.csv", dtype=str)
    assert list(sub.columns) == ["ImageId", "EncodedPixels"] and len(sub) == 8
    for row in sub.itertuples():
        png = cv2.imread(str(run / "cascade" / "masks_gated" / f"{row.ImageId}.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(rle_decode(row.EncodedPixels, height=png.shape[0], width=png.shape[1]), png)


def test_pseudo_masks_export_as_png_rle_and_coco(run, tmp_path):
    result = run_cli("export", "--run", str(run), "--cycle", "1", "--format", "masks", "--dest", str(tmp_path / "x"))
    assert result.returncode == 0, result.stderr
    coco = read_coco_masks(tmp_path / "x" / "pseudo_masks_coco.json")
    kept = pd.read_csv(run / "cycle1" / "pseudo" / "mask_pseudo.csv")
    assert set(coco) == set(kept.loc[kept["kept"], "image_id"])
    for image_id, mask in coco.items():
        png = cv2.imread(str(tmp_path / "x" / "masks" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(mask.astype(bool), png)


def test_report_has_a_mask_section_and_the_aux_classifier_is_a_plain_checkpoint(run):
    html = (run / "cycle1" / "report.html").read_text()
    assert "Pseudo masks" in html and "Kept (green) and rejected (red)" in html
    report = json.loads((run / "cycle1" / "report.json").read_text())
    assert set(report["masks"]) >= {"pixel_threshold", "confidence_histogram", "oof_dice_histogram"}
    students = json.loads((run / "summary.json").read_text())["cycles"][0]["pseudo"]["segmenter"]["students"]
    text = " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", html)).split())
    assert f"students' pseudo masks (all folds) {students['total']} " in text  # the folds' files, summed
    from cxr_noisy_student.teacher_student.models import load_classifier

    model, meta = load_classifier(run / "gen1" / "classifier" / "fold0" / "checkpoint.pt")
    assert not any(k.startswith("mask_head") for k in model.state_dict())  # prediction: the class head only


def test_classification_items_carry_their_mask_through_the_same_transform():
    from cxr_noisy_student.augment.transforms import student_transform
    from cxr_noisy_student.datasets.torch_data import ClassificationDataset

    image = np.zeros((32, 32), np.uint8)
    image[:, :16] = 200  # bright left half, and the mask marks exactly it
    mask = (image > 0).astype(np.uint8)
    ds = ClassificationDataset(lambda _: image, ["a", "b"], np.eye(2, dtype=np.float32), None,
                               student_transform(32, 2, 10, seed=3), 0.5, 0.25,
                               mask_of=lambda i: mask if i == 0 else None)
    for _ in range(5):
        item = ds[0]
        bright = item["image"][0].numpy() > 0
        assert item["mask_weight"] == 1 and (item["mask"][0] > 0).sum() > 0
        assert (bright == (item["mask"][0] > 0)).mean() > 0.9  # flips and warps moved both
    assert ds[1]["mask_weight"] == 0 and ds[1]["mask"].sum() == 0


def test_run_tasks_may_be_a_segmenter_alone_only_without_a_cascade():
    from cxr_noisy_student.datasets.errors import ConfigError
    from cxr_noisy_student.teacher_student.config import load_config

    cfg = load_config(None, ["run.tasks=segmenter", "segmenter.cascade.mode=off"])
    assert cfg.run.tasks == ("segmenter",)
    with pytest.raises(ConfigError, match="only a segmenter with segmenter.cascade.mode off runs alone"):
        load_config(None, ["run.tasks=segmenter"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["run.tasks=classifier,segmentor"])


def test_plan_lists_the_cascade_stage_as_done_by_the_run(run):
    result = run_cli("plan", "--config", str(run.parent / "seg.yaml"), "--out", str(run), "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["stage"]: row for row in json.loads(result.stdout)}
    assert rows["cascade"]["inputs"] == "gen1/segmenter/predictions, gen1/classifier/predictions"
    assert rows["cascade"]["status"] == "done"  # the runner's stage has the fingerprint plan computes
    assert {row["status"] for row in rows.values()} == {"done"}


def test_a_student_knob_does_not_retrain_the_teacher_or_the_references(run):
    result = run_cli("plan", "--config", str(run.parent / "seg.yaml"), "--out", str(run), "--format", "json",
                     "--set", "segmenter.pseudo_mode=soft")
    assert result.returncode == 0, result.stderr[-2000:]
    status = {row["stage"]: row["status"] for row in json.loads(result.stdout)}
    assert status["gen0/segmenter/fold0"] == status["ablation/segmenter/fold1"] == status["oracle/segmenter/fold0"] == "done"
    assert status["cycle1/pseudo"] == "done"  # how masks are chosen did not change, only how students read them
    assert status["gen1/segmenter/fold0"] == status["gen1/segmenter/fold1"] == "stale"


def test_fine_tuning_retrains_students_and_references_in_two_phases(run, tmp_path):
    knob = ("--set", "segmenter.finetune=0.5")
    result = run_cli("plan", "--config", str(run.parent / "seg.yaml"), "--out", str(run), "--format", "json", *knob)
    assert result.returncode == 0, result.stderr[-2000:]
    status = {row["stage"]: row["status"] for row in json.loads(result.stdout)}
    assert status["gen0/segmenter/fold0"] == status["cycle1/pseudo"] == "done"  # teachers have no fine-tuning
    assert status["gen1/segmenter/fold0"] == status["ablation/segmenter/fold0"] == status["oracle/segmenter/fold0"] == "stale"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = run_cli("run", "--config", str(run.parent / "seg.yaml"), "--out", str(copy), "--only", "gen1/segmenter/fold1",
                     *knob)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((copy / "gen1" / "segmenter" / "fold1" / "history.json").read_text())
    phases = [row["phase"] for row in history["history"]]
    assert phases == sorted(phases) and set(phases) == {0, 1} and history["epochs_run"] == len(phases)
    assert "fine-tune" in result.stderr  # the log names the phase
