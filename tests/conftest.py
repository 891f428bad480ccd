"""Shared fixtures: the real files in ../shared/data and a CPU-only, offline environment."""
import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates on import
os.environ.setdefault("YOLO_VERBOSE", "False")

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared data not found at {SHARED}: CI places shared/ beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def dicom_dir(shared_data) -> Path:
    return shared_data / "dicom-edge-cases"


@pytest.fixture(scope="session")
def cxr_dir(shared_data) -> Path:
    return shared_data / "cxr-covid-ieee8023"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread and do not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
