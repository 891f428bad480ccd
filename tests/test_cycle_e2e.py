"""End to end: a tiny real run (timm + YOLO, one cycle), its contracts, and kill/resume.

The kill harness SIGKILLs the command line at named points spread over every stage (the
``CXR_FAULT`` injection point in loops/stages.py, a real SIGKILL of the process) and once from
outside while a detector is training, reruns the same command each time, and requires the final
pseudo labels, predictions and summary to equal those of an uninterrupted run with the same seed.
``CXR_LONG_TESTS=1`` runs every kill point (the default runs a spread of five to fit CI's time).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tiny_run import ROOT, TINY, make_tiny_demo, run_cli, write_config

OUTSIDE = "outside: SIGKILL while gen0/detector/fold0 trains"
# In pipeline order: each rerun resumes and runs on until the next point.
SHORT_KILLS = ["gen0/classifier/fold1@outputs", OUTSIDE, "gen0/detector/predictions@swapped", "cycle1/pseudo@start",
               "gen1/classifier/fold0@outputs", "final@outputs"]
LONG_KILLS = ["data@outputs", "gen0/classifier/fold0@start", "gen0/classifier/fold1@outputs",
              "gen0/classifier/predictions@swapped", OUTSIDE, "gen0/detector/fold0@outputs",
              "gen0/detector/predictions@swapped",
              "cycle1/pseudo@start", "cycle1/pseudo@swapped", "gen1/classifier/fold0@outputs",
              "gen1/classifier/predictions@outputs", "gen1/detector/fold1@start", "gen1/detector/predictions@outputs",
              "final@swapped", "oracle/classifier/fold0@outputs", "oracle/detector/predictions@start"]
COMPARED = ["cycle1/pseudo/class_selection.csv", "cycle1/pseudo/class_pseudo.csv", "cycle1/pseudo/box_pseudo.csv",
            "cycle1/pseudo/box_images.csv", "gen1/classifier/predictions/oof.csv", "gen1/classifier/predictions/pool.csv",
            "gen1/detector/predictions/pool_fused.csv", "final/box_predictions_gated.csv", "final/submission_gated.csv"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data = make_tiny_demo(base / "demo")
    config = write_config(base / "tiny.yaml", data, run={**TINY["run"], "tensorboard": True})
    result = run_cli("--config", str(config), "--out", str(base / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run", config, result


def comparable_summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_seconds")
    summary.pop("stages")
    return summary


def test_tiny_run_end_to_end(baseline):
    run, _, result = baseline
    summary = json.loads((run / "summary.json").read_text())
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    for gen in summary["generations"]:
        assert gen["classifier"]["oof"]["n"] == 16 and gen["classifier"]["test"]["n"] == 8
        assert gen["detector"]["test"] is not None and "map" in gen["detector"]["test"]
    pseudo = summary["cycles"][0]["pseudo"]
    assert pseudo["classifier"]["unlabeled"] == 16
    precision = pseudo["classifier"]["precision"]  # None when nothing was kept
    assert precision is None or 0 <= precision <= 1
    assert summary["oracle"]["classifier"]["test"]["n"] == 8
    assert {"gated", "ungated"} <= set(summary["gate"]["test"])
    assert (run / "cycle1" / "report.html").stat().st_size > 10_000 and (run / "index.html").exists()
    for name in ("submission_raw.csv", "submission_gated.csv"):
        sub = pd.read_csv(run / "final" / name)
        assert list(sub.columns) == ["image_id", "PredictionString"] and len(sub) == 8
    assert "AUC oof" in result.stdout and "gen" in result.stdout


def test_what_a_user_sees_while_and_after_it_runs(baseline):
    """Generation scores as files, one log line per detector epoch, curves in the report and in
    TensorBoard for every fold model."""
    run, _, result = baseline
    summary = json.loads((run / "summary.json").read_text())
    for gen in summary["generations"]:
        assert json.loads((run / f"gen{gen['generation']}" / "metrics.json").read_text()) == gen
    for fold in (0, 1):  # ultralytics' extra validation call after the last epoch is not logged again
        assert result.stderr.count(f"detector gen 0 fold {fold}: epoch 1/1 |") == 1, result.stderr[-3000:]
        assert f"classifier gen 1 fold {fold}: epoch 1/" in result.stderr
    history = json.loads((run / "gen0" / "detector" / "fold0" / "history.json").read_text())
    assert [r["epoch"] for r in history["curve"]] == [1] and history["curve"][0]["train_loss"] is not None
    curves = json.loads((run / "cycle1" / "report.json").read_text())["training_curves"]
    assert {"classifier/gen0", "classifier/gen1", "detector/gen0", "detector/gen1"} <= set(curves)
    from cxr_noisy_student.loops.tensorboard import has_events

    for where in ("gen0/classifier", "gen1/detector", "ablation/classifier", "oracle/detector"):
        for fold in (0, 1):
            assert has_events(run / "tensorboard" / where / f"fold{fold}"), where


def test_the_report_of_a_real_run_leads_with_its_verdict(baseline, tmp_path):
    run, _, _ = baseline
    data = json.loads((run / "cycle1" / "report.json").read_text())
    head = data["headline"]
    assert head["sentence"].startswith("Cycle 1's students (2 folds")
    assert head["flags"] and "starve" in head["flags"][0]  # 14 box classes no tiny detector finds
    assert data["status"] is None  # refreshed at the end: no "student is training" note any more
    index = (run / "index.html").read_text()
    assert "What the pseudo labels gave" in index and "gap closed" in index and "oracle" in index
    import shutil

    if shutil.which("chromium") is None:
        pytest.skip("headless chromium is not installed")
    from test_report import flag_red_pixels, screenshot

    pixels = screenshot(run / "cycle1" / "report.html", tmp_path / "first.png")
    assert flag_red_pixels(pixels) > 200, "the headline's red flags are not on the first screen"


def test_every_labeled_image_is_predicted_once_by_a_model_that_never_saw_it(baseline):
    run, _, _ = baseline
    folds = pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    groups = pd.read_csv(run / "data" / "groups.csv", dtype={"image_id": str}).set_index("image_id")["group"]
    groups = groups[groups.index.isin(folds.index)]  # groups span every role; folds are the labeled images'
    assert (groups.groupby(groups).apply(lambda g: folds[g.index].nunique()) == 1).all()
    for gen in ("gen0", "gen1", "oracle"):
        oof = pd.read_csv(run / gen / "classifier" / "predictions" / "oof.csv", dtype={"image_id": str})
        assert sorted(oof["image_id"]) == sorted(folds.index)  # each labeled image exactly once
        assert (oof["fold"].to_numpy() == folds[oof["image_id"]].to_numpy()).all()
        for fold in (0, 1):
            seen = set((run / gen / "classifier" / f"fold{fold}" / "train_ids.txt").read_text().split())
            assert not seen & set(folds.index[folds == fold])
            assert seen & set(folds.index[folds != fold])


def test_checkpoints_carry_their_preprocessing(baseline):
    from cxr_noisy_student.teacher_student.models import load_classifier

    run, _, _ = baseline
    model, meta = load_classifier(run / "gen1" / "classifier" / "fold0" / "checkpoint.pt", "cpu")
    assert meta["preprocess"]["size"] == 64 and meta["class_names"] == ["No finding", "Abnormal"]
    assert meta["model_name"] == "test_efficientnet" and meta["drop_rate"] > 0  # the student is noised


def test_a_rerun_reuses_every_stage(baseline):
    run, config, _ = baseline
    before = comparable_summary(run)
    result = run_cli("--config", str(config), "--out", str(run))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert all(s["skipped"] for s in summary["stages"])
    assert comparable_summary(run) == before


def kill_from_outside_while_training(config: Path, out: Path) -> None:
    """SIGKILL the process once a detector fold is mid-training (its temporary directory exists)."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("CXR_FAULT", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_cycle.py"), "--config", str(config), "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((out / "gen0" / "detector").glob(".fold0.*.tmp/work")):
            time.sleep(1.0)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_killed_runs_resume_and_match_the_uninterrupted_run(baseline, tmp_path):
    run, config, _ = baseline
    out = tmp_path / "killed"
    for point in (LONG_KILLS if os.environ.get("CXR_LONG_TESTS") == "1" else SHORT_KILLS):
        if point == OUTSIDE:
            kill_from_outside_while_training(config, out)
            continue
        result = run_cli("--config", str(config), "--out", str(out), fault=point)
        assert result.returncode == -signal.SIGKILL, f"{point}: {result.returncode} {result.stderr[-1500:]}"
        if point.startswith("gen1/"):  # cycle 1's report exists while its student trains
            early = json.loads((out / "cycle1" / "report.json").read_text())
            assert "student is training" in early["status"] and (out / "index.html").exists()
    result = run_cli("--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in COMPARED:
        assert (out / name).read_bytes() == (run / name).read_bytes(), name
    assert comparable_summary(out) == comparable_summary(run)
    assert not [p for p in out.rglob("*.tmp")], "a killed run's temporary files were left behind"


@pytest.mark.parametrize("task", ["classifier", "detector"])
def test_a_fine_tuning_phase_ends_students_and_references_on_the_labels(baseline, tmp_path, task):
    run, config, _ = baseline
    knob = ("--set", f"{task}.finetune=0.5")
    result = run_cli("plan", "--config", str(config), "--out", str(run), "--format", "json", *knob)
    assert result.returncode == 0, result.stderr[-2000:]
    status = {row["stage"]: row["status"] for row in json.loads(result.stdout)}
    assert status[f"gen0/{task}/fold0"] == status["cycle1/pseudo"] == "done"  # teachers have one phase
    assert status[f"gen1/{task}/fold0"] == status[f"oracle/{task}/fold1"] == "stale"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = run_cli("run", "--config", str(config), "--out", str(copy), "--only", f"gen1/{task}/fold0", *knob)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((copy / "gen1" / task / "fold0" / "history.json").read_text())["history"]
    assert [row["phase"] for row in history] == sorted(row["phase"] for row in history)
    assert {row["phase"] for row in history} == {0, 1} and "fine-tune" in result.stderr
    if task == "detector":  # the second phase exported only the ground-truth images, and its epochs number on
        assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
        fold_dir = copy / "gen1" / task / "fold0"
        images = {p.stem for p in (fold_dir / "work_finetune" / "yolo_data" / "images" / "train").glob("*")}
        folds = pd.read_csv(copy / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
        trained = set((fold_dir / "train_ids.txt").read_text().split())
        assert images and images == {i for i in trained if i in folds.index and folds[i] != 0}
