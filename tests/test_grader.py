"""The ordinal grader end to end: a tiny real run of the demo's severity grades (timm, one epoch,
one cycle, ablation and oracle) through the command line, and the contracts read from its files:
thresholds chosen on each fold's own OOF images and stored in its checkpoint, prediction reading
them (never rounding at 0.5), OOF grades cut by cross-fitted thresholds, fold lineage of the
pseudo grades, and QWK in the summary, the gains and the report."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cxr_noisy_student.datasets.grades import grades_of
from cxr_noisy_student.loops.checkpoint import CheckpointError
from cxr_noisy_student.teacher_student import ordinal
from cxr_noisy_student.teacher_student.layout import fold_of_model
from tiny_run import make_tiny_demo, run_cli, write_config

GRADER = {"ladder": ["test_efficientnet", "test_efficientnet"], "train": {"epochs": 1, "batch_size": 16},
          "sampling": "inverse_frequency"}


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("grader")
    data = make_tiny_demo(base / "demo")
    config = write_config(base / "grader.yaml", data, grader=GRADER, detector={"enabled": False},
                          run={"cycles": 1, "oracle": True, "workers": 0, "tasks": ["classifier", "grader"]})
    result = run_cli("--config", str(config), "--out", str(base / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run", result


@pytest.fixture(scope="module")
def ctx(graded_run):
    from cxr_noisy_student.teacher_student.config import load_config
    from cxr_noisy_student.teacher_student.cycle.data_stage import prepare

    run, _ = graded_run
    return prepare(load_config(run / "config.yaml", [f"run.out={run}"]))


def test_the_summary_reports_qwk_per_generation_and_against_the_references(graded_run):
    run, result = graded_run
    summary = json.loads((run / "summary.json").read_text())
    for gen in summary["generations"]:
        g = gen["grader"]
        assert g["oof"]["n"] == 16 and g["test"]["n"] == 8 and g["unlabeled_truth"]["n"] == 16
        assert {"qwk", "qwk_rounded", "confusion", "mae"} <= set(g["oof"]) and len(g["thresholds"]) == 4
        assert np.sum(g["oof"]["confusion"]) == 16
    assert summary["ablation"]["grader"]["test"]["n"] == 8 and summary["oracle"]["grader"]["test"]["n"] == 8
    assert {"teacher", "student", "ablation", "oracle", "gap_closed"} <= set(summary["gains"]["grader_qwk"])
    students = summary["cycles"][0]["pseudo"]["grader"]["students"]
    assert students["total"] == sum(students["kept_per_grade"].values())
    assert "QWK oof" in result.stdout and "grader QWK (test)" in result.stdout


def test_each_checkpoint_stores_thresholds_fitted_on_its_own_oof_images(graded_run, ctx):
    from cxr_noisy_student.teacher_student.tasks.grader import GraderTask

    run, _ = graded_run
    task = GraderTask(ctx)
    for fold in (0, 1):
        fold_dir = run / "gen0" / "grader" / f"fold{fold}"
        meta = torch.load(fold_dir / "checkpoint.pt", weights_only=True)["meta"]
        assert meta["preprocess"]["size"] == 64 and meta["num_grades"] == 5 and meta["activation"] == "sigmoid"
        val = [i for i in task.labeled_ids() if ctx.folds[i] == fold]
        pred = task.predict(fold_dir, fold, val)
        refit = ordinal.fit_thresholds(grades_of(ctx.table, val), pred["expected"], num_grades=5)
        assert meta["ordinal_thresholds"] == pytest.approx(refit.tolist())
        assert pred["grade"].tolist() == ordinal.threshold_grades(pred["expected"],
                                                                  thresholds=meta["ordinal_thresholds"]).tolist()


def test_prediction_uses_the_stored_thresholds_not_rounding(graded_run, ctx, tmp_path):
    """Rewrite a checkpoint's thresholds: above every score -> grade 0 everywhere, below -> grade 4;
    without them the checkpoint is refused, so nothing can fall back to rounding at k - 0.5."""
    from cxr_noisy_student.teacher_student.tasks.grader import GraderTask

    run, _ = graded_run
    task, ids = GraderTask(ctx), GraderTask(ctx).labeled_ids()
    source = run / "gen1" / "grader" / "fold0" / "checkpoint.pt"
    for thresholds, grade in (([10.0, 20.0, 30.0, 40.0], 0), ([-4.0, -3.0, -2.0, -1.0], 4), (None, None)):
        fold_dir = tmp_path / f"fold_{grade}"
        fold_dir.mkdir()
        ckpt = torch.load(source, weights_only=True)
        if thresholds is None:
            del ckpt["meta"]["ordinal_thresholds"]
        else:
            ckpt["meta"]["ordinal_thresholds"] = thresholds
        torch.save(ckpt, fold_dir / "checkpoint.pt")
        if thresholds is None:
            with pytest.raises(CheckpointError, match="no ordinal thresholds"):
                task.predict(fold_dir, 0, ids)
        else:
            assert set(task.predict(fold_dir, 0, ids)["grade"]) == {grade}


def test_oof_grades_are_cut_by_the_other_folds_thresholds(graded_run):
    run, _ = graded_run
    folds = pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    for gen in ("gen0", "gen1", "ablation", "oracle"):
        pred = run / gen / "grader" / "predictions"
        oof = pd.read_csv(pred / "oof.csv", dtype={"image_id": str})
        assert sorted(oof["image_id"]) == sorted(folds.index)  # every graded labeled image once...
        assert (oof["fold"].to_numpy() == folds[oof["image_id"]].to_numpy()).all()  # ...by its own fold's model
        cross = json.loads((pred / "thresholds.json").read_text())["cross_fitted"]
        for fold, rows in oof.groupby("fold"):
            assert rows["grade"].tolist() == ordinal.threshold_grades(rows["expected"],
                                                                      thresholds=cross[str(fold)]).tolist()


def test_student_fold_k_learns_only_grades_made_without_fold_k(graded_run):
    run, _ = graded_run
    folds = pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]
    for k in (0, 1):
        where = run / "cycle1" / "pseudo" / f"fold{k}"
        rows = pd.read_csv(where / "grade_pseudo.csv", dtype={"models": str})
        assert {fold_of_model(m) for tags in rows["models"].dropna() for m in tags.split(";")} <= {k}
        record = json.loads((where / "grade_pseudo.json").read_text())
        assert record["threshold_oof_folds"] == [1 - k] and record["models"] == ["f0", "f1"][k:k + 1]
        student = set((run / "gen1" / "grader" / f"fold{k}" / "train_ids.txt").read_text().split())
        assert not student & set(folds.index[folds == k]) and set(rows["image_id"]) <= student
    ensemble = pd.read_csv(run / "cycle1" / "pseudo" / "grade_pseudo.csv", dtype={"models": str})
    assert set(ensemble["models"].dropna()) <= {"f0;f1"}


def test_the_report_has_the_ordinal_section(graded_run):
    run, _ = graded_run
    report = json.loads((run / "cycle1" / "report.json").read_text())["grader"]
    assert np.sum(report["oof"]["confusion"]) == 16 and len(report["per_grade"]) == 5
    assert report["thresholds"][0]["thresholds"].startswith("selection: ensemble")
    assert "Ordinal grader" in (run / "cycle1" / "report.html").read_text()
