"""Scaling out without changing a byte: the process-pool and Ray executors, stages run one by one
(``plan`` / ``run --only``), a whole run submitted wave by wave through the README's sbatch
scripts, and a classifier fold trained under torchrun.

Every run here is a tiny real one (the demo format at 64 px, timm models for one epoch, one cycle),
compared with a plain local run of the same config. Byte for byte is the claim: workers keep one
torch thread each and so does the local reference (``OMP_NUM_THREADS=1``), and each fold is seeded
on its own, so where a fold trains cannot change its numbers. (With different thread counts the
float reductions of a convolution are summed in another order and the last bits differ.) The
default is classifier-only, to fit CI's time; ``CXR_LONG_TESTS=1`` adds the YOLO detector.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import ROOT, make_tiny_demo, run_cli, write_config

LONG = os.environ.get("CXR_LONG_TESTS") == "1"
TASKS = ["classifier", "detector"] if LONG else ["classifier"]
RUN = {"cycles": 1, "oracle": False, "ablation": LONG, "workers": 0, "tasks": TASKS}
COMPARED = ["cycle1/pseudo/class_selection.csv", "cycle1/pseudo/class_pseudo.csv", "cycle1/pseudo/fold0/class_pseudo.csv",
            "gen0/classifier/predictions/oof.csv", "gen0/classifier/predictions/pool_folds.csv",
            "gen1/classifier/predictions/oof.csv", "gen1/classifier/predictions/pool.csv",
            "gen1/classifier/predictions/labeled_folds.csv", "final/class_predictions.csv"]
if LONG:
    COMPARED += ["cycle1/pseudo/box_pseudo.csv", "cycle1/pseudo/box_images.csv", "gen1/detector/predictions/pool_raw.csv",
                 "gen1/detector/predictions/pool_fused.csv", "final/box_predictions_gated.csv",
                 "ablation/classifier/predictions/oof.csv", "ablation/detector/predictions/oof_boxes.csv"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line with one torch thread, like every worker of the parallel executors."""
    full = {**os.environ, **ONE_THREAD, "YOLO_OFFLINE": "1", **(env or {})}
    full.pop("CXR_FAULT", None)
    return subprocess.run([sys.executable, str(ROOT / "run_cycle.py"), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    config = write_config(base / "tiny.yaml", make_tiny_demo(base / "demo"), run=RUN)
    result = cli("--config", str(config), "--out", str(base / "local"), "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    return base, config


def comparable_summary(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("stages", "wall_seconds")}


def assert_same_run(run: Path, reference: Path) -> None:
    for name in COMPARED:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert comparable_summary(run) == comparable_summary(reference)


def test_processes_executor_gives_the_local_run(tiny):
    base, config = tiny
    result = cli("--config", str(config), "--out", str(base / "processes"), "--set", "run.executor=processes",
                 "--set", "run.fold_workers=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(processes)" in result.stderr  # the folds really ran in the pool
    assert_same_run(base / "processes", base / "local")


def test_ray_executor_gives_the_local_run(tiny):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    base, config = tiny
    result = cli("--config", str(config), "--out", str(base / "ray"), "--set", "run.executor=ray",
                 "--set", "run.fold_workers=2", env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ray: local, 2 CPUs" in result.stderr and "(ray)" in result.stderr
    assert_same_run(base / "ray", base / "local")


def test_ray_absent_is_one_line(monkeypatch):
    from cxr_noisy_student.datasets.errors import ConfigError
    from cxr_noisy_student.loops.executor import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r"Ray is not installed.*pip install 'cxr-noisy-student\[ray\]'") as err:
        make_executor("ray")
    assert "\n" not in str(err.value)


def plan_rows(config: Path, out: Path) -> dict[str, dict]:
    result = cli("plan", "--config", str(config), "--out", str(out), "--format", "json")
    assert result.returncode == 0, result.stderr[-2000:]
    return {row["stage"]: row for row in json.loads(result.stdout)}


def test_plan_lists_the_stages_with_inputs_and_status(tiny, tmp_path):
    base, config = tiny
    rows = plan_rows(config, base / "local")
    assert set(row["status"] for row in rows.values()) == {"done"}
    assert rows["gen1/classifier/fold1"]["inputs"] == "cycle1/pseudo, gen0/classifier/predictions"
    assert rows["gen0/classifier/predictions"]["inputs"] == "gen0/classifier/fold[0-1]"
    assert rows["gen0/classifier/fold0"]["wave"] == 1 and rows["final"]["wave"] == 6
    fresh = plan_rows(config, tmp_path / "fresh")
    assert fresh["data"]["status"] == "ready" and fresh["final"]["status"] == "waiting"
    assert not (tmp_path / "fresh").exists()  # plan only reads
    changed = cli("plan", "--config", str(config), "--out", str(base / "local"), "--set", "gate.low=0.05")
    header, *lines = changed.stdout.splitlines()
    assert header.split() == ["stage", "wave", "status", "inputs", "outputs"]
    status = {line.split()[0]: line.split()[2] for line in lines if "/" in line}
    assert status["gen1/classifier/predictions"] == "done" and status["final"] == "stale"  # only the gate changed
    assert lines[-1] == "8 done, 1 stale"


def test_only_refuses_a_stage_whose_inputs_are_not_done(tiny, tmp_path):
    _, config = tiny
    out = ["--config", str(config), "--out", str(tmp_path / "run")]
    result = cli("run", *out, "--only", "gen0/classifier/fold0")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: gen0/classifier/fold0: its inputs are not done: data (run_cycle.py run --only data first)"]
    assert cli("run", *out, "--only", "data").returncode == 0
    result = cli("run", *out, "--only", "cycle1/pseudo")
    assert result.returncode == 2 and "its inputs are not done: gen0/classifier/predictions" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli("run", *out, "--only", "gen9/classifier/fold0")
    assert result.returncode == 2 and "no stage of this config matches" in result.stderr


def test_a_run_submitted_wave_by_wave_through_sbatch_is_the_local_run(tiny, tmp_path):
    """The README's Slurm scripts, with a stand-in sbatch that runs each array task at once."""
    base, config = tiny
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(ROOT / "tests" / "fake_sbatch", bin_dir / "sbatch")
    out = tmp_path / "slurm-run"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CXR_CYCLE": f"{sys.executable} {ROOT / 'run_cycle.py'}",
           **ONE_THREAD, "YOLO_OFFLINE": "1"}
    result = subprocess.run(["bash", str(ROOT / "docs" / "slurm" / "submit.sh"), str(config), str(out)], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:] + (tmp_path / "slurm-run-slurm").joinpath("finish.log").read_text()[-2000:]
    assert "wave 1: 2 stage(s)" in result.stdout  # the two gen0 folds: one array job
    fold_log = (tmp_path / "slurm-run-slurm" / "wave1-2.log").read_text()
    assert "gen0/classifier/fold1: done" in fold_log
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["skipped"] for s in summary["stages"])  # the finishing job only reused stages
    assert_same_run(out, base / "local")


def test_a_classifier_fold_trains_under_torchrun(tiny, tmp_path):
    """Two gloo processes train one fold model; rank 0 alone writes it, in the usual checkpoint."""
    from cxr_noisy_student.teacher_student.models import load_classifier

    base, config = tiny
    out = tmp_path / "ddp"
    out.mkdir()
    for name in ("data", "data.done.json", "cache", "config.yaml"):  # the data stage, done
        (shutil.copytree if (base / "local" / name).is_dir() else shutil.copy)(base / "local" / name, out / name)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "run_cycle.py"), "run", "--config", str(config), "--out", str(out),
                             "--only", "gen0/classifier/fold1"], cwd=ROOT, env={**os.environ, **ONE_THREAD},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("gen0/classifier/fold1: done") == 1  # rank 0 reports, once
    marker = json.loads((out / "gen0" / "classifier" / "fold1.done.json").read_text())
    local = json.loads((base / "local" / "gen0" / "classifier" / "fold1.done.json").read_text())
    assert marker["fingerprint"] == local["fingerprint"]  # the same stage a plain run makes (and reuses)
    model, meta = load_classifier(out / "gen0" / "classifier" / "fold1" / "checkpoint.pt", "cpu")
    assert meta["fold"] == 1 and meta["preprocess"]["size"] == 64
    assert not list(out.rglob("*.tmp")) and not list((out / "gen0" / "classifier").glob("fold0*"))
    rows = plan_rows(config, out)
    assert rows["gen0/classifier/fold1"]["status"] == "done" and rows["gen0/classifier/fold0"]["status"] == "ready"
    refused = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "run_cycle.py"), "run", "--config", str(config), "--out", str(out),
                              "--only", "gen0/classifier/predictions"], cwd=ROOT, env={**os.environ, **ONE_THREAD},
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "under torchrun only classifier fold stages run" in refused.stderr
