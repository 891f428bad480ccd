"""The engine installs next to Hugging Face ``datasets`` and both work in one environment.

Why: Kaggle images and most ML environments ship HF ``datasets``. The card fixes the folder name
``datasets/`` for the engine's data layer, so the installed engine must never be a top-level
``datasets`` package: it is the import root ``cxr_noisy_student`` mapped onto the card's folders
(setup.py ``package_dir``), with relative imports inside. Checked for real, in subprocesses that
see only what an installed user sees (working directory outside the checkout, no test paths):

- a regular install (``pip install --no-deps --target``, built from this checkout without
  network) holds no top-level ``datasets/``, and in its environment ``import datasets`` is HF's,
  ``Dataset.from_dict`` works, and ``run_cycle --print-config`` runs in the same process;
- an editable install (``pip install -e`` into a throwaway virtual environment that sees this
  environment's packages) does the same, and the checkout's own ``run_cycle.py`` runs too.

Costs about 20 s (two local builds); needs pip and setuptools in this environment, as the README's
install does, and HF ``datasets`` (in the ``test`` extra).
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOTH = """
import sys
import datasets
assert hasattr(datasets, "Dataset"), f"'datasets' is not Hugging Face's: {datasets.__file__}"
ds = datasets.Dataset.from_dict({"image_id": ["a", "b"], "label": [0, 1]})
assert ds.num_rows == 2 and ds[1]["label"] == 1
from cxr_noisy_student.datasets.table import ItemTable  # the engine's data layer, under its own root
from cxr_noisy_student.datasets.errors import DataError
import run_cycle
sys.argv = ["run_cycle.py", "--print-config"]
code = run_cycle.main(["--print-config"])
assert code == 0, code
import datasets as again
assert again is datasets and hasattr(again, "Dataset"), "the engine replaced HF datasets in sys.modules"
print("BOTH OK", datasets.__file__)
"""


def hf_datasets_location() -> str | None:
    """Where HF datasets is installed in this environment, seen from outside the checkout."""
    probe = subprocess.run([sys.executable, "-c", "import datasets, sys; print(datasets.__file__ if hasattr(datasets, "
                            "'Dataset') else '')"], cwd="/", capture_output=True, text=True, env=clean_env())
    return probe.stdout.strip() or None


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CXR_FAULT")}
    env.update(YOLO_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", **extra)
    return env


def run(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, args)), cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def hf_datasets():
    where = hf_datasets_location()
    if where is None:
        pytest.skip("Hugging Face datasets is not installed (pip install -e '.[test]' brings it)")
    import setuptools

    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build a wheel offline (the test extra brings >= 70.1)")
    return where


def test_regular_install_has_no_top_level_datasets_and_coexists(hf_datasets, tmp_path):
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--target", target, ROOT, cwd=tmp_path)
    assert not (target / "datasets").exists(), "the install would overwrite Hugging Face's datasets package"
    for folder in ("datasets", "loops", "augment", "teacher_student"):
        assert (target / "cxr_noisy_student" / folder / "__init__.py").exists(), folder
    assert (target / "cxr_noisy_student" / "teacher_student" / "presets" / "demo.yaml").exists()
    assert (target / "run_cycle.py").exists()
    result = run(sys.executable, "-c", BOTH, cwd=tmp_path, env=clean_env(PYTHONPATH=str(target)))
    assert "BOTH OK" in result.stdout and str(target) not in result.stdout.split("BOTH OK")[1]
    cli = run(sys.executable, "-m", "run_cycle", "--print-config", cwd=tmp_path, env=clean_env(PYTHONPATH=str(target)))
    assert "classifier:" in cli.stdout


def test_editable_install_coexists_and_the_checkout_still_runs(hf_datasets, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    # the throwaway environment sees this one's packages (torch, HF datasets...), as a user's would
    ours = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    (purelib / "outer.pth").write_text("\n".join(ours) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-build-isolation",
        "--no-index", "-e", ROOT, cwd=tmp_path)
    result = run(python, "-c", BOTH, cwd=tmp_path)
    assert "BOTH OK" in result.stdout
    checkout = run(python, ROOT / "run_cycle.py", "--print-config", cwd=tmp_path)
    assert "classifier:" in checkout.stdout
    hf = run(python, "-c", "import datasets; print(datasets.Dataset.from_dict({'x': [1]}).num_rows)", cwd=tmp_path)
    assert hf.stdout.strip() == "1"
