"""No patient-identifying DICOM tag reaches a report, a log, a table or an export.

One real end-to-end run of the command line on a tiny demo-format dataset (DICOMs whose patient
tags are synthetic, plus a few files given distinctive names, ids, birth dates and institutions
with pydicom), then every export format; every file the run and the exports wrote, and the run's
captured stdout + stderr, is searched for those values. Patient ids survive only as their
pseudonym (``datasets.readers.pseudonymize``), which is what keeps patients together in the folds.

Also: the fold checkpoints load with ``torch.load(weights_only=True)``, and no project code
unpickles (``pickle.load``, ``weights_only=False``...), checked on the syntax tree of every .py file.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import torch

from cxr_noisy_student.datasets.demo import make_demo_dataset
from cxr_noisy_student.datasets.readers import pseudonymize

ROOT = Path(__file__).resolve().parents[1]
IDENTIFYING_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
                    "AccessionNumber", "OtherPatientIDs")
DISTINCTIVE = [  # set on some files on top of the demo's synthetic DEMO^PATIENT^0042 / DEMOPAT0042
    {"PatientName": "Quokkaberg^Zebedee^Ormond", "PatientID": "MRN-QX-77301", "PatientBirthDate": "19450704",
     "InstitutionName": "St Quimby Memorial Infirmary", "ReferringPhysicianName": "Xylophant^Dr",
     "AccessionNumber": "ACC99QQ123"},
    {"PatientName": "Vantablack^Honoria", "PatientID": "NHS 943 476 5919", "PatientBirthDate": "19621231",
     "InstitutionName": "Krumpet County General"},
]
CLI = [sys.executable, "run_cycle.py"]
SMALLEST = ["--cycles", "1", "--set", "data.format=vinbigdata",  # "demo" would (re)generate the default demo
            "--set", "classifier.train.epochs=1", "--set", "classifier.ladder=test_efficientnet",
            "--set", "detector.epochs=1", "--set", "detector.img_size=64", "--set", "preprocess.size=64",
            "--set", "folds.k=2", "--set", "run.oracle=false", "--set", "run.workers=0"]
EXPORTS = {"csv": "pseudo.csv", "yolo": "yolo", "coco": "coco.json", "submission": "submission"}
TEXT_SUFFIXES = {".csv", ".json", ".yaml", ".yml", ".html", ".txt", ".log", ".md"}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""Tiny models on a shared 2-core machine: one torch thread ran this run in 14 s, two in 19 s
(idle) to 115 s (other jobs running), as threads then wait on each other."""


def _mark_patients(root: Path) -> dict[str, str]:
    """Give the distinctive identities to two training images and one pool image; image id -> PatientID."""
    files = [*sorted((root / "train").glob("*.dicom"))[:2], *sorted((root / "test").glob("*.dicom"))[:1]]
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        for tag, value in DISTINCTIVE[min(i, 1)].items():
            setattr(ds, tag, value)
        ds.save_as(path)
    return {p.stem: str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in root.rglob("*.dicom")}


def _identities(root: Path) -> tuple[set[str], set[str]]:
    """(strings to find nowhere, birth dates to find in no text file) from every DICOM's header."""
    strings, dates = {"DEMO^PATIENT", "DEMOPAT", "DEMO PATIENT"}, set()
    for path in root.rglob("*.dicom"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in IDENTIFYING_TAGS:
            value = str(ds.get(tag, "") or "").strip()
            if tag == "PatientBirthDate" and value:
                dates |= {value, f"{value[:4]}-{value[4:6]}-{value[6:]}"}
            elif len(value) > 3:
                strings |= {value, value.replace("^", " ")}
                strings |= {part for part in value.split("^") if len(part) >= 5 and part.isalpha() and
                            part not in ("DEMO", "PATIENT")}
    return strings, dates


@pytest.fixture(scope="module")
def privacy_run(tmp_path_factory):
    """The demo-format data, one run of the command line, every export; what they wrote and logged."""
    base = tmp_path_factory.mktemp("privacy")
    data, run, exports = base / "data", base / "run", base / "exports"
    make_demo_dataset(data, n_labeled=9, n_unlabeled=6, n_test=3, size=64)
    patient_ids = _mark_patients(data)
    done = subprocess.run([*CLI, *SMALLEST, "--data", str(data), "--out", str(run)], cwd=ROOT, env=ONE_THREAD,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    log = done.stdout
    assert done.returncode == 0, log[-3000:]
    procs = [subprocess.Popen([*CLI, "export", "--run", str(run), "--format", fmt, "--dest", str(exports / dest),
                               *(["--include-labeled"] if fmt in ("csv", "coco") else [])], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for fmt, dest in EXPORTS.items()]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        log += out
    return {"data": data, "run": run, "exports": exports, "log": log, "patient_ids": patient_ids}


def _written_files(privacy_run) -> list[Path]:
    files = [p for top in (privacy_run["run"], privacy_run["exports"]) for p in top.rglob("*") if p.is_file()]
    assert len(files) > 50
    return files


def test_no_identifying_tag_value_in_any_output_or_log(privacy_run):
    strings, dates = _identities(privacy_run["data"])
    assert {"MRN-QX-77301", "Quokkaberg", "St Quimby Memorial Infirmary", "DEMO^PATIENT"} <= strings
    needles = [s.lower().encode() for s in strings]
    date_pattern = re.compile(rb"(?<!\d)(" + b"|".join(re.escape(d.encode()) for d in sorted(dates)) + rb")(?!\d)")
    files = _written_files(privacy_run)
    suffixes = {p.suffix for p in files}
    assert {".csv", ".json", ".yaml", ".html", ".pt", ".png"} <= suffixes, suffixes
    assert (privacy_run["run"] / "cycle1" / "report.html").is_file() and (privacy_run["run"] / "index.html").is_file()
    leaks = []
    for path, blob in [*((p, p.read_bytes()) for p in files), (Path("captured.log"), privacy_run["log"].encode())]:
        low = blob.lower()
        leaks += [(str(path), n.decode()) for n in needles if n in low]  # binary files (.pt, .png) too
        if path.suffix in TEXT_SUFFIXES or path.name == "captured.log":
            leaks += [(str(path), m.decode()) for m in date_pattern.findall(blob)]
    assert not leaks, leaks[:10]


def test_items_hold_the_patient_pseudonym_not_the_raw_id(privacy_run):
    items = pd.read_csv(privacy_run["run"] / "data" / "items.csv", dtype=str).set_index("image_id")
    raw = privacy_run["patient_ids"]
    assert set(items.index) <= set(raw) and len(items) == 15  # 9 labeled + 6 pool (holdout: demo format only)
    expected = {image_id: pseudonymize(raw[image_id]) for image_id in items.index}
    assert items["patient_id"].to_dict() == expected
    assert not set(items["patient_id"]) & set(raw.values())
    marked = pseudonymize("MRN-QX-77301")
    assert (items["patient_id"] == marked).sum() == 1 and len(set(items["patient_id"])) > 3
    folds = pd.read_csv(privacy_run["run"] / "data" / "folds.csv", dtype=str)
    assert set(folds["image_id"]) == set(items.index[items["role"] == "labeled"])


def test_fold_checkpoints_load_with_weights_only(privacy_run):
    run = privacy_run["run"]
    found = sorted([*run.glob("gen*/classifier/fold*/checkpoint.pt"), *run.glob("gen*/detector/fold*/detector.pt")])
    assert len(found) == 2 * 2 * 2  # generations 0 and 1 x classifier, detector x 2 folds
    for path in found:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["format"] and ckpt["state_dict"], path
        assert ckpt["state_dict"] and all(isinstance(t, torch.Tensor) for t in ckpt["state_dict"].values()), path


# ---------------------------------------------------------------------------- project code

SKIP_DIRS = {"site-packages", "node_modules", "build", "dist", "runs", "demo_data", "__pycache__"}


def _project_files() -> list[Path]:
    """The project's own .py files: not virtual environments, hidden folders or build output."""
    files = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts[:-1]
        if not any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") or "venv" in p for p in parts):
            files.append(path)
    return files


def _call_name(func: ast.expr) -> str:
    """'pickle.load' for pickle.load(...), 'eval' for eval(...), '' for anything else."""
    if isinstance(func, ast.Attribute):
        return f"{getattr(func.value, 'id', '?')}.{func.attr}"
    return getattr(func, "id", "")


UNPICKLERS = {f"{module}.{fn}" for module in ("pickle", "cPickle", "dill", "joblib")
              for fn in ("load", "loads", "Unpickler")}


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that unpickle or could: pickle/dill/joblib loads, weights_only=False, torch.load
    without weights_only=True, numpy allow_pickle=True, yaml.load/unsafe_load, eval/exec.

    The syntax tree, not a grep: a comment or docstring that names these is no call.
    """
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
        weights_only = keywords.get("weights_only", None if name == "torch.load" else True)
        if name in UNPICKLERS or name in ("yaml.load", "yaml.unsafe_load", "eval", "exec"):
            found.append((node.lineno, name))
        elif weights_only is not True:
            found.append((node.lineno, f"{name} without weights_only=True"))
        elif keywords.get("allow_pickle") is True:
            found.append((node.lineno, f"{name} with allow_pickle=True"))
    return found


def test_project_code_never_unpickles():
    files = _project_files()
    names = [p.relative_to(ROOT).as_posix() for p in files]
    expected = {"run_cycle.py", "loops/checkpoint.py", "teacher_student/detectors/__init__.py", "tests/test_privacy.py"}
    assert expected <= set(names)
    assert not any("site-packages" in n for n in names)
    unsafe = [(name, *hit) for path, name in zip(files, names) for hit in _unsafe_calls(ast.parse(path.read_text()))]
    assert not unsafe, unsafe
    sample = ("import pickle, torch\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
              "np.load(f, allow_pickle=True)\nyaml.safe_load(t)\ntorch.load(p, weights_only=True)\n# pickle.load(f)\n")
    assert [line for line, _ in _unsafe_calls(ast.parse(sample))] == [2, 3, 4, 5]  # it sees what it looks for
