"""No leakage through pseudo labels, and no hidden truth in selection or training.

Student fold k is scored on fold k (its OOF predictions, and the next cycle's thresholds are read
from them), so everything it learns from must come from models that never saw fold k's labels:
its pseudo labels from teacher fold k alone, their thresholds from the other folds' OOF
predictions, its soft targets from teacher fold k. These tests read a real tiny run's files and
check that lineage from the records the stages write (models, threshold folds, training ids), and
that the run-time guard refuses pseudo labels made by the whole ensemble (the leak put back).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.teacher_student.layout import fold_of_model
from cxr_noisy_student.teacher_student.tasks.base import assert_fold_lineage
from tiny_run import make_tiny_demo, run_cli, write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run twice: with the demo's hidden truth, and with it hidden from the engine."""
    base = tmp_path_factory.mktemp("lineage")
    data = make_tiny_demo(base / "demo")
    out = {}
    for name, truth in (("with_truth", True), ("without_truth", False)):
        config = write_config(base / f"{name}.yaml", data, run={"cycles": 1, "oracle": False, "ablation": False,
                                                                  "workers": 0})
        result = run_cli("--config", str(config), "--out", str(base / name), "--set", f"data.hidden_truth={truth}")
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = base / name
    return out


def fold_table(run: Path) -> pd.Series:
    return pd.read_csv(run / "data" / "folds.csv", dtype={"image_id": str}).set_index("image_id")["fold"]


def trained_on(run: Path, gen: int, task: str, fold: int) -> set[str]:
    return set((run / f"gen{gen}" / task / f"fold{fold}" / "train_ids.txt").read_text().split())


@pytest.mark.parametrize("task, table, info", [("classifier", "class_pseudo.csv", "class_pseudo.json"),
                                               ("detector", "box_pseudo.csv", "box_pseudo.json")])
def test_student_fold_k_learns_only_from_models_that_never_saw_fold_k(runs, task, table, info):
    run = runs["with_truth"]
    folds = fold_table(run)
    for k in (0, 1):
        where = run / "cycle1" / "pseudo" / f"fold{k}"
        rows = pd.read_csv(where / table, dtype={"models": str})
        models = {tag for tags in rows["models"].dropna() for tag in tags.split(";")}
        assert {fold_of_model(m) for m in models} <= {k}, f"fold {k} pseudo labels from {models}"
        record = json.loads((where / info).read_text())
        assert k not in record["threshold_oof_folds"] and record["threshold_oof_folds"]
        # ... and the teacher model they name never trained on a fold-k image
        assert not trained_on(run, 0, task, k) & set(folds.index[folds == k])
        # the student fold trained on those pseudo-labeled images and its own fold's labels never
        student = trained_on(run, 1, task, k)
        assert not student & set(folds.index[folds == k])
    fold_record = json.loads((run / "gen1" / "classifier" / "fold0.done.json").read_text())
    assert fold_record["result"]["model"]  # the stage ran for real


def test_the_ensemble_selection_is_kept_apart_for_reports_and_exports(runs):
    run = runs["with_truth"]
    ensemble = pd.read_csv(run / "cycle1" / "pseudo" / "class_pseudo.csv", dtype={"models": str})
    assert set(ensemble["models"].dropna()) <= {"f0;f1"}
    summary = json.loads((run / "summary.json").read_text())
    students = summary["cycles"][0]["pseudo"]["classifier"]["students"]
    per_fold = summary["cycles"][0]["pseudo"]["classifier"]["folds"]
    assert students["total"] == sum(sum(f["kept_per_class"].values()) for f in per_fold.values())


def test_hidden_truth_never_reaches_selection_or_training(runs):
    """Pseudo labels, student targets and predictions are the same whether the engine can read the
    pool's hidden truth or not; only the measurements differ."""
    a, b = runs["with_truth"], runs["without_truth"]
    compared = [p.relative_to(a) for p in sorted((a / "cycle1" / "pseudo").rglob("*.csv"))]
    compared += [Path("gen1") / t / "predictions" / f for t, f in (("classifier", "oof.csv"), ("classifier", "pool.csv"),
                                                                 ("detector", "pool_fused.csv"))]
    assert len(compared) > 10
    for rel in compared:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs when the truth is hidden"
    with_truth = json.loads((a / "cycle1" / "pseudo" / "fold0" / "class_pseudo.json").read_text())
    without = json.loads((b / "cycle1" / "pseudo" / "fold0" / "class_pseudo.json").read_text())
    assert without["precision"] is None and without["precision_per_class"] == {}
    assert {k: v for k, v in with_truth.items() if "precision" not in k} == \
        {k: v for k, v in without.items() if "precision" not in k}


def test_the_guard_refuses_the_leak_put_back(tmp_path):
    """Pseudo labels made by the whole ensemble, or thresholds read on the fold's own OOF rows, are
    exactly the leak: the guard every student fold plan runs through names it in one line."""
    assert_fold_lineage(1, ["f1", "f1/orig;f1/hflip"], [0, 2], where=tmp_path)
    with pytest.raises(DataError, match="come from model 'f0'.*saw fold 1's labels"):
        assert_fold_lineage(1, ["f0;f1"], [0], where=tmp_path)
    with pytest.raises(DataError, match="come from model 'f0/hflip'"):
        assert_fold_lineage(1, ["f1/orig;f0/hflip"], [0], where=tmp_path)
    with pytest.raises(DataError, match="chosen on fold 1's own OOF"):
        assert_fold_lineage(1, ["f1"], [0, 1], where=tmp_path)


def test_a_student_plan_built_on_the_ensemble_selection_fails(runs, tmp_path):
    """Replace fold 0's pseudo labels by the ensemble's (what the engine did before): planning the
    student folds must stop with the leak named, not train."""
    import shutil

    import run_cycle  # noqa: F401  (maps the import root)
    from cxr_noisy_student.teacher_student.config import load_config
    from cxr_noisy_student.teacher_student.cycle.data_stage import prepare
    from cxr_noisy_student.teacher_student.tasks.classifier import ClassifierTask

    run = tmp_path / "run"
    shutil.copytree(runs["with_truth"], run)
    cfg = load_config(run / "config.yaml", [f"run.out={run}"])
    pseudo = run / "cycle1" / "pseudo"
    shutil.copy(pseudo / "class_pseudo.csv", pseudo / "fold0" / "class_pseudo.csv")
    task = ClassifierTask(prepare(cfg))
    with pytest.raises(DataError, match="leak"):
        task.fold_plans(1, pseudo, run / "gen0" / "classifier" / "predictions")
