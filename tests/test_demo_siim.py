"""The demo in the SIIM-COVID19 layout: Kaggle's files and tree, deterministic, read back by the adapter."""
from __future__ import annotations

import filecmp
import json

import pandas as pd
import pydicom
import pytest

from cxr_noisy_student.datasets.adapters import load_dataset, load_hidden_truth
from cxr_noisy_student.datasets.adapters.siim import SIIM_STUDY_CLASSES, parse_siim_boxes
from cxr_noisy_student.datasets.config import DataConfig
from cxr_noisy_student.datasets.demo import make_demo_dataset
from cxr_noisy_student.datasets.demo_siim import make_siim_demo

SMALL = dict(n_labeled=9, n_unlabeled=8, n_test=3, size=64)


@pytest.fixture(scope="module")
def siim_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("siim") / "data"
    make_siim_demo(root, seed=0, **SMALL)
    return root


def test_files_are_kaggles_siim_layout(siim_root):
    studies = pd.read_csv(siim_root / "train_study_level.csv")
    images = pd.read_csv(siim_root / "train_image_level.csv", keep_default_na=False)
    assert list(studies.columns) == ["id", *SIIM_STUDY_CLASSES] and (studies[list(SIIM_STUDY_CLASSES)].sum(axis=1) == 1).all()
    assert list(images.columns) == ["id", "boxes", "label", "StudyInstanceUID"]
    assert len(images) == 10 and len(studies) == 9  # the eighth study holds a second image
    for row in images.itertuples():
        boxes = parse_siim_boxes(row.boxes)
        assert row.label == "none 1 0 0 1 1" if not boxes else row.label.count("opacity 1 ") == len(boxes)
        path = siim_root / "train" / row.StudyInstanceUID
        assert len(list(path.glob(f"*/{row.id.removesuffix('_image')}.dcm"))) == 1
    negative = set(studies.loc[studies["Negative for Pneumonia"] == 1, "id"].str.removesuffix("_study"))
    assert all(label == "none 1 0 0 1 1" for label in images.loc[images["StudyInstanceUID"].isin(negative), "label"])
    ds = pydicom.dcmread(next((siim_root / "test").rglob("*.dcm")))
    assert ds.Modality == "CR" and ds.Rows > 0


def test_same_seed_same_bytes_and_the_adapter_reads_it_whole(siim_root, tmp_path):
    make_siim_demo(tmp_path / "again", seed=0, **SMALL)
    files = [p.relative_to(siim_root) for p in siim_root.rglob("*") if p.is_file()]
    _, mismatch, errors = filecmp.cmpfiles(siim_root, tmp_path / "again", [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    cfg = DataConfig(format="demo", demo_layout="siim", root=str(siim_root))
    table = load_dataset(cfg)
    assert table.quarantine.empty and table.summary()["roles"] == {"labeled": 10, "unlabeled": 9, "test": 3}
    assert table.items["study_id"].notna().all() and table.box_classes == ("opacity",)
    truth = load_hidden_truth(cfg)
    assert set(truth.items["image_id"]) == set(table.with_role("unlabeled")["image_id"])
    manifest = json.loads((siim_root / "demo_manifest.json").read_text())
    train_copy, test_copy = manifest["cross_role_duplicate"]
    paths = table.items.set_index("image_id")["path"]
    assert (pydicom.dcmread(paths[train_copy]).PixelData == pydicom.dcmread(paths[test_copy]).PixelData)


def test_one_folder_switches_layouts_without_leftovers(tmp_path):
    root = tmp_path / "data"
    make_demo_dataset(root, seed=0, **SMALL)
    make_siim_demo(root, seed=0, **SMALL)
    assert not (root / "train.csv").exists() and not list((root / "train").glob("*.dicom"))
    make_demo_dataset(root, seed=0, **SMALL)
    assert not (root / "train_study_level.csv").exists() and not list((root / "train").rglob("*.dcm"))
