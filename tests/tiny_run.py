"""A tiny but real run of the engine for end-to-end tests: the demo format at 64 px, real timm and
YOLO models for one epoch, run through the command line in a subprocess (as a user would)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "preprocess": {"size": 64},
    "folds": {"k": 2},
    "classifier": {"ladder": ["test_efficientnet", "test_efficientnet"], "train": {"epochs": 1, "batch_size": 16}},
    "detector": {"ladder": ["yolov8n.yaml"], "img_size": 64, "epochs": 1, "batch_size": 8},
    "run": {"cycles": 1, "oracle": True, "workers": 0},
}


def make_tiny_demo(root: Path) -> Path:
    from cxr_noisy_student.datasets.demo import make_demo_dataset

    make_demo_dataset(root, n_labeled=16, n_unlabeled=16, n_test=8, size=64)
    return root


def write_config(path: Path, data_root: Path, **sections) -> Path:
    cfg = {**TINY, "data": {"format": "demo", "root": str(data_root), "demo_counts": [16, 16, 8], "demo_image_size": 64},
           **sections}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, fault: str | None = None, timeout: float = 600, threads: int = 2) -> subprocess.CompletedProcess:
    """The command line in a subprocess; ``threads``: torch's (one is far faster for tiny models on
    a machine whose cores other jobs also use: two threads then wait on each other)."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": str(threads)}
    env.pop("CXR_FAULT", None)
    if fault:
        env["CXR_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "run_cycle.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
