"""The built-in demo dataset: deterministic, real DICOM, VinBigData CSVs, boxes that cover lesions."""
import filecmp
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from cxr_noisy_student.datasets import demo, demo_images
from cxr_noisy_student.datasets.boxes import iou_matrix
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.atomic import read_json

SMALL = {"n_labeled": 6, "n_unlabeled": 6, "n_test": 6, "size": 128}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    demo.make_demo_dataset(root, seed=0, **SMALL)
    return root


def _all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _dicoms(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.dicom"))


def _display(ds) -> np.ndarray:
    """Stored values turned so that dense is bright (what MONOCHROME1 inverts)."""
    pixels = ds.pixel_array.astype(np.float64)
    return 4095 - pixels if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def test_same_seed_gives_byte_identical_files(demo_root, tmp_path):
    demo.make_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    files = _all_files(demo_root)
    assert files == _all_files(tmp_path / "again")
    _, mismatch, errors = filecmp.cmpfiles(demo_root, tmp_path / "again", [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    demo.make_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    assert (tmp_path / "other" / "train.csv").read_bytes() != (demo_root / "train.csv").read_bytes()


def test_every_file_is_a_readable_12_bit_chest_cr(demo_root):
    datasets = [pydicom.dcmread(p) for p in _dicoms(demo_root)]
    assert len(datasets) == 18
    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Modality, ds.BodyPartExamined, ds.BitsStored) == ("CR", "CHEST", 12)
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() <= 4095
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert str(ds.PatientName).startswith("DEMO^PATIENT^")
    assert any(ds.PhotometricInterpretation == "MONOCHROME1" for ds in datasets)
    assert any(ds.PhotometricInterpretation == "MONOCHROME2" for ds in datasets)
    assert any("WindowCenter" in ds for ds in datasets) and any("RescaleSlope" in ds for ds in datasets)
    assert max(Counter(ds.PatientID for ds in datasets).values()) >= 2, "some patients must have several images"


def test_monochrome1_stores_lungs_bright(demo_root):
    """In stored values a MONOCHROME1 lung is brighter than the mediastinum; in MONOCHROME2 darker."""
    for path in _dicoms(demo_root):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)

        def patch(x: float, y: float) -> float:
            r, c = int(y * ds.Rows), int(x * ds.Columns)
            return float(np.median(pixels[r - 2:r + 3, c - 2:c + 3]))

        lung = min(patch(*xy) for xy in demo_images.LUNG_CENTERS) if ds.PhotometricInterpretation == "MONOCHROME2" \
            else max(patch(*xy) for xy in demo_images.LUNG_CENTERS)
        mediastinum = patch(0.5, 0.47)
        assert (lung > mediastinum) == (ds.PhotometricInterpretation == "MONOCHROME1"), path.name


def _read(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, keep_default_na=True)


@pytest.mark.parametrize("name, folder, readers", [
    ("train.csv", "train", {f"R{i}" for i in range(1, 18)}),
    ("holdout.csv", "holdout", {"R0"}),
    ("unlabeled_truth.csv", "test", {"R0"}),
])
def test_csv_is_vinbigdata_format_with_boxes_inside_the_image(demo_root, name, folder, readers):
    df = _read(demo_root, name)
    assert list(df.columns) == demo.CSV_COLUMNS
    assert set(df["image_id"]) == {p.stem for p in (demo_root / folder).glob("*.dicom")}
    assert set(df["rad_id"]) <= readers
    assert (df["class_name"] == [demo.VINBIGDATA_CLASSES[c] for c in df["class_id"]]).all()
    normal = df["class_id"] == demo.NO_FINDING_ID
    assert df.loc[normal, ["x_min", "y_min", "x_max", "y_max"]].isna().all().all()
    assert set(df.loc[~normal, "class_id"]) <= set(demo_images.DEMO_CLASS_IDS)
    for row in df[~normal].itertuples():
        ds = pydicom.dcmread(demo_root / folder / f"{row.image_id}.dicom", stop_before_pixels=True)
        assert 0 <= row.x_min < row.x_max <= ds.Columns and 0 <= row.y_min < row.y_max <= ds.Rows
    rads_per_image = df.groupby("image_id")["rad_id"].nunique()
    assert rads_per_image.between(1, 3).all()


def test_study_label_follows_lesions(demo_root):
    """Per reader: either exactly one No finding row or only boxes; the manifest counts agree."""
    manifest = read_json(demo_root / demo.MANIFEST)
    for name, split in (("train.csv", "labeled"), ("holdout.csv", "holdout"), ("unlabeled_truth.csv", "unlabeled")):
        df = _read(demo_root, name)
        for _, rows in df.groupby(["image_id", "rad_id"]):
            normal = rows["class_id"] == demo.NO_FINDING_ID
            assert normal.sum() == 0 or len(rows) == 1
        if split != "labeled":
            abnormal = df[df["class_id"] != demo.NO_FINDING_ID]["image_id"].nunique()
            assert abnormal == manifest["abnormal"][split]
    assert 0 < sum(manifest["abnormal"].values()) < 18, "the demo needs both normal and abnormal images"


def test_readers_agree_roughly_but_not_exactly(demo_root):
    """Several radiologists box the same lesion with jitter (IoU well above 0.5, never identical)."""
    df = _read(demo_root, "train.csv").dropna(subset=["x_min"])
    ious = []
    for _, rows in df.groupby(["image_id", "class_id"]):
        readers = [g[["x_min", "y_min", "x_max", "y_max"]].to_numpy() for _, g in rows.groupby("rad_id")]
        for a, b in zip(readers, readers[1:]):
            ious += list(iou_matrix(a, b).max(axis=1))
    assert len(ious) >= 5
    assert np.median(ious) > 0.6 and max(ious) < 1.0


def test_boxes_cover_their_lesions():
    """Nearly all of the lesion signal lies inside the boxes, and a visible nodule is brighter than its ring."""
    inside_share, contrasts = [], []
    for seed in range(16):
        case = demo_images.synthesize_case(np.random.default_rng(seed), width=96, height=112, normal=False)
        covered = np.zeros(case.image.shape, dtype=bool)
        for lesion in case.lesions:
            x0, y0, x1, y1 = (int(round(v)) for v in lesion.box)
            covered[y0:y1, x0:x1] = True
            if lesion.class_id == demo_images.NODULE_ID and lesion.visibility > 0.5:
                ring = np.zeros_like(covered)
                ring[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4] = True
                ring[y0:y1, x0:x1] = False
                contrasts.append(case.image[y0:y1, x0:x1].mean() - case.image[ring].mean())
        inside_share.append(case.lesion_layer[covered].sum() / case.lesion_layer.sum())
    assert min(inside_share) > 0.95  # boxes end where a lesion falls below 10% of its peak
    assert len(contrasts) >= 3 and np.mean(np.array(contrasts) > 0) >= 0.8


def test_exact_boxes_in_the_files_sit_on_their_lesions(demo_root):
    """Black-box check of the written files: inside an exact box, an image is brighter against the box's
    ring than the other images are at the same place (ranks, so the anatomy around the box cancels out)."""
    images = {}
    for path in list((demo_root / "holdout").glob("*.dicom")) + list((demo_root / "test").glob("*.dicom")):
        pixels = _display(pydicom.dcmread(path))
        images[path.stem] = (pixels - pixels.mean()) / pixels.std()

    def contrast(image: np.ndarray, box) -> float:
        h, w = image.shape
        x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h))
        ring = np.zeros(image.shape, dtype=bool)
        ring[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
        ring[y0:y1, x0:x1] = False
        return float(image[y0:y1, x0:x1].mean() - image[ring].mean())

    ranks = []
    for name in ("holdout.csv", "unlabeled_truth.csv"):
        for row in _read(demo_root, name).dropna(subset=["x_min"]).itertuples():
            h, w = images[row.image_id].shape
            box = (row.x_min / w, row.y_min / h, row.x_max / w, row.y_max / h)
            others = [contrast(img, box) for key, img in images.items() if key != row.image_id]
            ranks.append(np.mean(np.array(others) < contrast(images[row.image_id], box)))
    assert len(ranks) >= 6 and np.median(ranks) >= 0.7


def test_duplicates_are_pixel_identical_under_new_ids(demo_root):
    pairs = read_json(demo_root / demo.MANIFEST)["duplicates"]
    assert pairs
    labeled = set(_read(demo_root, "train.csv")["image_id"])
    for source, copy in pairs:
        assert source != copy and {source, copy} <= labeled
        a, b = (pydicom.dcmread(demo_root / "train" / f"{i}.dicom") for i in (source, copy))
        assert a.PixelData == b.PixelData and a.SOPInstanceUID != b.SOPInstanceUID


def test_second_call_reuses_and_partial_is_rebuilt(demo_root, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")}
    start = time.perf_counter()
    result = demo.make_demo_dataset(demo_root, seed=0, **SMALL)
    assert result["reused"] and time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")} == before

    partial = tmp_path / "partial"
    shutil.copytree(demo_root, partial)
    victim = _dicoms(partial)[3]
    victim.unlink()
    assert not demo.make_demo_dataset(partial, seed=0, **SMALL)["reused"]
    assert victim.read_bytes() == (demo_root / victim.relative_to(partial)).read_bytes()


def test_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "train").mkdir()
    keep = tmp_path / "train" / "real.dicom"
    keep.write_bytes(b"not ours")
    with pytest.raises(DataError, match="not empty"):
        demo.make_demo_dataset(tmp_path, **SMALL)
    assert keep.read_bytes() == b"not ours"
    with pytest.raises(ValueError, match=">= 1"):
        demo.make_demo_dataset(tmp_path / "new", n_labeled=0)
