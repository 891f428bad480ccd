"""Shared fixtures: the real files in ../shared/data and a CPU-only, offline environment."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_cycle  # noqa: E402,F401  maps the import root onto this checkout, whatever is installed

from cxr_noisy_student.datasets.environment import set_offline_defaults  # noqa: E402

set_offline_defaults()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

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
