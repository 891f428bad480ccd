"""Adapters: VinBigData, SIIM-COVID19 and generic layouts -> ItemTable; every bad input reported.

Fixtures are tiny real files: 64x48 PNGs and copies of the shared SIIM-ACR chest DICOM (1024x1024)
with their PatientID edited by pydicom. Every bad-input kind has its own case: in quarantine mode
the row is in ``table.quarantine`` and the rows in equal the rows out plus the quarantined ones; in
error mode the same row stops the load with a one-line DataError naming the file and the line.
"""
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cxr_noisy_student.datasets.adapters import load_dataset, load_hidden_truth, training_boxes
from cxr_noisy_student.datasets.adapters.generic import CXR_COVID_STUDY_CLASSES, load_cxr_covid, load_generic
from cxr_noisy_student.datasets.adapters.siim import load_siim, parse_siim_boxes
from cxr_noisy_student.datasets.adapters.vinbigdata import FUSED_SOURCE, VINBIG_BOX_CLASSES, load_vinbigdata
from cxr_noisy_student.datasets.readers import pseudonymize
from cxr_noisy_student.datasets.table import Quarantine
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.config import DataConfig

SIIM_FILE = "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
DICOM_SIZE = 1024


def _png(path: Path, size=(64, 48), value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) + value) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _dicom(src: Path, dest: Path, patient_id: str) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(src)
    ds.PatientID = patient_id
    ds.save_as(dest)
    return dest


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(path: Path) -> int:
    return len(pd.read_csv(path, dtype=str))


def _error_message(load) -> str:
    with pytest.raises(DataError) as info:
        load(Quarantine("error"))
    return str(info.value)


# ---------------------------------------------------------------------------- VinBigData

VINBIG_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
VINBIG_ROWS = [
    VINBIG_HEADER,
    "a,Nodule/Mass,8,R1,100,200,300,400",
    "a,Nodule/Mass,8,R2,110,210,310,410",
    "a,No finding,14,R3,,,,",
    "b,No finding,14,R1,,,,",
    "b,No finding,14,R2,,,,",
    "c,Cardiomegaly,3,R1,8,12,40,36",
]


@pytest.fixture
def vinbig_root(tmp_path, dicom_dir) -> Path:
    src = dicom_dir / SIIM_FILE
    _dicom(src, tmp_path / "train" / "a.dicom", "PAT-A")
    _dicom(src, tmp_path / "train" / "b.dicom", "")
    _png(tmp_path / "train" / "c.png")
    _dicom(src, tmp_path / "test" / "d.dicom", "PAT-D")
    _png(tmp_path / "test" / "e.png", value=7)
    _write(tmp_path / "train.csv", VINBIG_ROWS)
    return tmp_path


def _vinbig_accounting(root: Path, table) -> None:
    """Rows in train.csv = raw boxes + 'No finding' rows of kept images + quarantined rows."""
    csv = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    kept = set(table.items["image_id"])
    no_finding = int(((csv["class_id"] == "14") & csv["image_id"].isin(kept)).sum())
    raw = int((table.boxes["source"] != FUSED_SOURCE).sum())
    assert len(csv) == raw + no_finding + len(table.quarantine)


def test_vinbigdata_loads_labels_boxes_patients_and_pool(vinbig_root):
    table = load_vinbigdata(vinbig_root)
    items = table.items.set_index("image_id")
    assert table.quarantine.empty
    assert items["role"].to_dict() == {"a": "labeled", "b": "labeled", "c": "labeled", "d": "unlabeled",
                                       "e": "unlabeled"}
    # abnormal when ANY radiologist drew a box (a: two of three readers), normal otherwise
    assert items.loc[["a", "b", "c"], "y:Abnormal"].tolist() == [1.0, 0.0, 1.0]
    assert items.loc[["d", "e"], "y:Abnormal"].isna().all()
    assert items["box_labeled"].to_dict() == {"a": True, "b": True, "c": True, "d": False, "e": False}
    assert items.loc["a", "patient_id"] == pseudonymize("PAT-A")
    assert items.loc["b", "patient_id"] == "b"  # empty PatientID -> the image id
    assert items.loc["d", "patient_id"] == pseudonymize("PAT-D")
    assert (items.loc["a", "width"], items.loc["c", "width"], items.loc["c", "height"]) == (DICOM_SIZE, 64, 48)
    raw = table.boxes[table.boxes["source"] != FUSED_SOURCE]
    assert sorted(raw["source"]) == ["R1", "R1", "R2"]
    r1 = raw[(raw["image_id"] == "a") & (raw["source"] == "R1")].iloc[0]
    np.testing.assert_allclose(r1[["x_min", "y_min", "x_max", "y_max"]].astype(float),
                               np.array([100, 200, 300, 400]) / DICOM_SIZE, rtol=1e-6)
    assert table.box_classes[int(r1["class_id"])] == "Nodule/Mass"
    _vinbig_accounting(vinbig_root, table)


def test_vinbigdata_fuses_radiologists_and_training_boxes_prefers_fused(vinbig_root):
    table = load_vinbigdata(vinbig_root)
    fused = table.boxes[table.boxes["source"] == FUSED_SOURCE].set_index("image_id")
    assert sorted(fused.index) == ["a", "c"]  # R1 and R2 agree on a (IoU 0.9): one fused box
    np.testing.assert_allclose(fused.loc["a", ["x_min", "x_max"]].astype(float), np.array([105, 305]) / DICOM_SIZE,
                               rtol=1e-5)
    train = training_boxes(table)
    assert (train["source"] == FUSED_SOURCE).all() and len(train) == 2
    unfused = load_vinbigdata(vinbig_root, fuse=False)
    assert FUSED_SOURCE not in set(unfused.boxes["source"])
    assert len(training_boxes(unfused)) == 3


@pytest.mark.parametrize("line, problem", [
    ("c,Cardiomegaly,3,R2,8,12,400,36", "outside the image"),
    ("c,Cardiomegaly,3,R2,40,12,8,36", "inverted"),
    ("c,Cardiomegaly,3,R2,8,12,8,36", "zero area"),
    ("c,Cardiomegaly,3,R2,8,,40,36", "missing/NaN"),
    ("c,Cardiomegaly,3,R2,8,abc,40,36", "not all numbers"),
    ("c,Banana,20,R2,8,12,40,36", "unknown class"),
    ("c,Banana,3,R2,8,12,40,36", "unknown class"),
    ("zzz,Cardiomegaly,3,R1,8,12,40,36", "labels for an absent image"),
])
def test_vinbigdata_bad_row_is_quarantined_or_raises(vinbig_root, line, problem):
    csv = _write(vinbig_root / "train.csv", [*VINBIG_ROWS, line])
    table = load_vinbigdata(vinbig_root)
    entry = table.quarantine.iloc[0]
    assert len(table.quarantine) == 1 and entry["row"] == len(VINBIG_ROWS) + 1
    assert entry["file"] == str(csv) and problem in entry["problem"]
    _vinbig_accounting(vinbig_root, table)
    if line.startswith("c,"):  # c lost a reader's row: still abnormal, but its boxes are incomplete
        assert not table.items.set_index("image_id").loc["c", "box_labeled"]
    message = _error_message(lambda q: load_vinbigdata(vinbig_root, quarantine=q))
    assert f"train.csv, row {len(VINBIG_ROWS) + 1}" in message and problem in message and "\n" not in message


def test_vinbigdata_reports_unlisted_files_and_duplicate_ids(vinbig_root):
    _png(vinbig_root / "train" / "x.png")
    _png(vinbig_root / "test" / "a.png")  # the same id as a labeled image
    table = load_vinbigdata(vinbig_root)
    problems = dict(zip(table.quarantine["image_id"], table.quarantine["problem"]))
    assert "has no rows in" in problems["x"] and "duplicated image id" in problems["a"]
    assert table.items.set_index("image_id").loc["a", "role"] == "labeled"


def test_empty_and_header_only_csv_fail_with_one_line(vinbig_root):
    (vinbig_root / "train.csv").write_text("")
    assert "train.csv: the file is empty" in _error_message(lambda q: load_vinbigdata(vinbig_root, quarantine=q))
    (vinbig_root / "train.csv").write_text(VINBIG_HEADER + "\n")
    with pytest.raises(DataError, match="header but no rows"):
        load_vinbigdata(vinbig_root)


def test_wrong_column_names_name_file_missing_found_and_a_hint(vinbig_root):
    _write(vinbig_root / "train.csv", [VINBIG_HEADER.replace("x_min", "xmin"), *VINBIG_ROWS[1:]])
    with pytest.raises(DataError) as info:
        load_vinbigdata(vinbig_root)
    message = str(info.value)
    assert "train.csv: missing columns ['x_min']" in message
    assert "did you mean 'xmin' for 'x_min'" in message and "found columns" in message and "\n" not in message


def test_demo_layout_holdout_and_hidden_truth(vinbig_root):
    _png(vinbig_root / "holdout" / "h.png")
    _write(vinbig_root / "holdout.csv", [VINBIG_HEADER, "h,Cardiomegaly,3,R1,1,1,20,20"])
    _write(vinbig_root / "unlabeled_truth.csv", [VINBIG_HEADER, "d,Atelectasis,1,R1,10,10,500,500",
                                                  "e,No finding,14,R1,,,,"])
    cfg = DataConfig(format="demo", root=str(vinbig_root))
    table = load_dataset(cfg)
    assert table.items.set_index("image_id").loc["h", "role"] == "test"
    assert table.summary()["roles"] == {"labeled": 3, "unlabeled": 2, "test": 1}
    truth = load_hidden_truth(cfg)
    assert truth.items.set_index("image_id")["y:Abnormal"].to_dict() == {"d": 1.0, "e": 0.0}
    assert set(truth.items["role"]) == {"unlabeled"} and truth.quarantine.empty
    assert load_hidden_truth(DataConfig(format="generic", root=str(vinbig_root))) is None
    with pytest.raises(DataError, match="box_classes"):
        load_dataset(DataConfig(format="vinbigdata", root=str(vinbig_root), box_classes=("x",)))
    assert load_dataset(DataConfig(format="vinbigdata", root=str(vinbig_root))).box_classes == VINBIG_BOX_CLASSES


# ---------------------------------------------------------------------------- SIIM-COVID19

SIIM_STUDY_HEADER = "id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,Atypical Appearance"
SIIM_STUDIES = [SIIM_STUDY_HEADER, "S1_study,0,1,0,0", "S2_study,1,0,0,0"]
SIIM_IMAGES = [
    "id,boxes,label,StudyInstanceUID",
    "i1_image,\"[{'x': 100, 'y': 200, 'width': 300, 'height': 100}]\",opacity 1 100 200 400 300,S1",
    "i2_image,,none 1 0 0 1 1,S1",
    "i3_image,,none 1 0 0 1 1,S2",
]


@pytest.fixture
def siim_root(tmp_path, dicom_dir) -> Path:
    src = dicom_dir / SIIM_FILE
    _dicom(src, tmp_path / "train" / "S1" / "se1" / "i1.dcm", "PA")
    _dicom(src, tmp_path / "train" / "S1" / "se1" / "i2.dcm", "PA")
    _dicom(src, tmp_path / "train" / "S2" / "se2" / "i3.dcm", "")
    _dicom(src, tmp_path / "test" / "S9" / "se9" / "u1.dcm", "PU")
    _write(tmp_path / "train_study_level.csv", SIIM_STUDIES)
    _write(tmp_path / "train_image_level.csv", SIIM_IMAGES)
    return tmp_path


def test_siim_propagates_study_labels_and_reads_boxes(siim_root):
    table = load_siim(siim_root)
    items = table.items.set_index("image_id")
    assert table.quarantine.empty and table.normal_class == "Negative for Pneumonia"
    assert items.loc[["i1", "i2"], "y:Typical Appearance"].tolist() == [1.0, 1.0]
    assert items.loc["i3", "y:Negative for Pneumonia"] == 1.0 and items.loc["u1", "role"] == "unlabeled"
    assert items.loc["i1", "patient_id"] == items.loc["i2", "patient_id"] == pseudonymize("PA")
    assert items.loc["i3", "patient_id"] == "S2"  # no PatientID -> the study id
    assert items.loc[["i1", "i2", "i3"], "box_labeled"].all()
    box = table.boxes.iloc[0]
    assert len(table.boxes) == 1 and box["image_id"] == "i1"
    np.testing.assert_allclose(box[["x_min", "y_min", "x_max", "y_max"]].astype(float),
                               np.array([100, 200, 400, 300]) / DICOM_SIZE, rtol=1e-6)


def test_siim_boxes_are_parsed_as_literals_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match="cannot parse boxes"):
        parse_siim_boxes(f"__import__('os').system('touch {marker}')")
    assert not marker.exists()
    assert parse_siim_boxes("[{'x': 1, 'y': 2, 'width': 3, 'height': 4}]") == [(1.0, 2.0, 4.0, 6.0)]


@pytest.mark.parametrize("table_name, line, problem", [
    ("train_image_level.csv", "i4_image,\"[{'x': 1, 'y'\",none 1 0 0 1 1,S2", "cannot parse boxes"),
    ("train_image_level.csv",
     "i4_image,\"[{'x': 900, 'y': 10, 'width': 500, 'height': 10}]\",opacity 1 900 10 1400 20,S2", "outside the image"),
    ("train_image_level.csv", "i4_image,,opacity 1 1 1 5 5,S2", "does not match"),
    ("train_image_level.csv", "i4_image,,none 1 0 0 1 1,S7", "image without labels"),
    ("train_image_level.csv", "i9_image,,none 1 0 0 1 1,S2", "missing image file"),
    ("train_image_level.csv", "i3_image,,none 1 0 0 1 1,S2", "duplicated image id"),
    ("train_study_level.csv", "S3_study,1,1,0,0", "exactly one"),
    ("train_study_level.csv", "S4_study,0,0,1,0", "labels for absent images"),
])
def test_siim_bad_row_is_quarantined_or_raises(siim_root, dicom_dir, table_name, line, problem):
    _dicom(dicom_dir / SIIM_FILE, siim_root / "train" / "S2" / "se2" / "i4.dcm", "PB")
    rows = SIIM_IMAGES if table_name == "train_image_level.csv" else SIIM_STUDIES
    csv = _write(siim_root / table_name, [*rows, line])
    table = load_siim(siim_root)
    entries = table.quarantine[table.quarantine["file"] == str(csv)]
    assert len(entries) == 1 and entries.iloc[0]["row"] == len(rows) + 1 and problem in entries.iloc[0]["problem"]
    labeled_in = _rows(siim_root / "train_image_level.csv")
    image_rows_out = int((table.items["role"] == "labeled").sum())
    image_rows_rejected = int((table.quarantine["file"] == str(siim_root / "train_image_level.csv")).sum())
    assert labeled_in == image_rows_out + image_rows_rejected - ("outside" in problem)  # bad box, image kept
    message = _error_message(lambda q: load_siim(siim_root, quarantine=q))
    assert f"{table_name}, row {len(rows) + 1}" in message and problem in message and "\n" not in message


# ---------------------------------------------------------------------------- generic

GENERIC_IMAGES = [
    "image_id,path,patient_id,label,role,width,height",
    "g1,images/g1.png,p1,sick,,64,48",
    "g2,images/g2.png,p1,well,,,",
    "g3,,p2,,,,",
    "g4,images/g4.png,p3,,test,,",
]
GENERIC_LABELS = [
    "image_id,box_class,x_min,y_min,x_max,y_max,box_annotated",
    "g1,lesion,8,12,40,36,1",
    "g2,,,,,,1",
    "g3,,,,,,0",
]


@pytest.fixture
def generic_root(tmp_path) -> Path:
    for i, name in enumerate(["g1", "g2", "g3", "g4", "g5"]):
        _png(tmp_path / "images" / f"{name}.png", value=i)
    _write(tmp_path / "images.csv", GENERIC_IMAGES)
    _write(tmp_path / "labels.csv", GENERIC_LABELS)
    return tmp_path


def _load_generic(root: Path, quarantine=None):
    return load_generic(root, "images.csv", "labels.csv", study_label_column="label", study_classes=("sick", "well"),
                        normal_class="well", box_classes=("lesion",), quarantine=quarantine)


def _generic_accounting(root: Path, table) -> None:
    """images.csv rows = items + quarantined; labels.csv rows = boxes + marker rows + quarantined."""
    quarantined = table.quarantine["file"].value_counts()
    assert _rows(root / "images.csv") == len(table.items) + quarantined.get(str(root / "images.csv"), 0)
    labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    markers = int(((labels["box_class"] == "") & labels["image_id"].isin(table.items["image_id"])).sum())
    assert len(labels) == len(table.boxes) + markers + quarantined.get(str(root / "labels.csv"), 0)


def test_generic_roles_labels_and_box_annotation(generic_root):
    table = _load_generic(generic_root)
    items = table.items.set_index("image_id")
    assert table.quarantine.empty
    assert items["role"].to_dict() == {"g1": "labeled", "g2": "labeled", "g3": "unlabeled", "g4": "test"}
    assert items["has_study_label"].to_dict() == {"g1": True, "g2": True, "g3": False, "g4": False}
    assert items["box_labeled"].to_dict() == {"g1": True, "g2": True, "g3": False, "g4": False}
    assert items.loc["g3", "path"] == str((generic_root / "images" / "g3.png").resolve())
    np.testing.assert_allclose(table.boxes.iloc[0][["x_min", "y_min", "x_max", "y_max"]].astype(float),
                               [8 / 64, 12 / 48, 40 / 64, 36 / 48], rtol=1e-6)
    assert table.abnormal_targets(["g1", "g2"]).tolist() == [1.0, 0.0]
    _generic_accounting(generic_root, table)


@pytest.mark.parametrize("table_name, line, problem", [
    ("images.csv", "g1,images/g5.png,p9,sick,,,", "duplicated image id"),
    ("images.csv", "g5,../../etc/passwd,p9,sick,,,", "escapes the data root"),
    ("images.csv", "g9,images/g9.png,p9,sick,,,", "missing image file"),
    ("images.csv", "g5,images/g5.png,p5,,labeled,,", "image without labels"),
    ("images.csv", "g5,images/g5.png,p5,banana,,,", "unknown class"),
    ("images.csv", "g5,images/g5.png,p5,sick,train,,", "unknown role"),
    ("images.csv", "g5,images/g5.png,p5,sick,,99,48", "disagrees with the image file"),
    ("labels.csv", "zz,lesion,1,1,5,5,1", "labels for an absent image"),
    ("labels.csv", "g3,lesion,1,1,5,5,0", "box_annotated=0"),
    ("labels.csv", "g1,tumour,1,1,5,5,1", "unknown box class"),
    ("labels.csv", "g1,lesion,1,1,500,5,1", "outside the image"),
])
def test_generic_bad_row_is_quarantined_or_raises(generic_root, table_name, line, problem):
    rows = GENERIC_IMAGES if table_name == "images.csv" else GENERIC_LABELS
    csv = _write(generic_root / table_name, [*rows, line])
    table = _load_generic(generic_root)
    assert len(table.quarantine) == 1
    entry = table.quarantine.iloc[0]
    assert entry["file"] == str(csv) and entry["row"] == len(rows) + 1 and problem in entry["problem"]
    _generic_accounting(generic_root, table)
    message = _error_message(lambda q: _load_generic(generic_root, q))
    assert f"{table_name}, row {len(rows) + 1}" in message and problem in message and "\n" not in message


def test_shared_cxr_set_loads_with_the_right_counts(cxr_dir):
    table = load_cxr_covid(cxr_dir)
    images = pd.read_csv(cxr_dir / "images.csv")
    assert table.quarantine.empty and len(table.items) == 251 and set(table.items["role"]) == {"labeled"}
    assert table.study_classes == CXR_COVID_STUDY_CLASSES and table.normal_class == "No Finding"
    assert int(table.items["y:No Finding"].sum()) == 14 and int(table.items["y:COVID-19"].sum()) == 169
    assert int(table.items["box_labeled"].sum()) == int(images["box_annotated"].sum()) == 110
    assert len(table.boxes) == 220 and set(table.boxes["source"]) == {"gt"}
    assert (table.items.set_index("image_id").loc[images["image_id"], "patient_id"].to_numpy()
            == images["patient_id"].astype(str).to_numpy()).all()
    cfg = DataConfig(format="generic", root=str(cxr_dir), images_csv="images.csv", labels_csv="labels.csv",
                     study_label_column="label_group", normal_class="No Finding")
    via_config = load_dataset(cfg)
    assert via_config.study_classes == tuple(sorted(CXR_COVID_STUDY_CLASSES)) and len(via_config.boxes) == 220


def test_every_siim_image_has_its_study_labeled_or_not(siim_root, dicom_dir):
    """Labeled: the CSV's StudyInstanceUID; unlabeled: the <study>/<series>/<image>.dcm tree, else the
    DICOM's StudyInstanceUID tag, else a quarantine line (the submission needs a study per image)."""
    flat = _dicom(dicom_dir / SIIM_FILE, siim_root / "test" / "flat.dcm", "PF")
    ds = pydicom.dcmread(flat)
    ds.StudyInstanceUID = "1.2.3.4"
    ds.save_as(flat)
    nameless = _dicom(dicom_dir / SIIM_FILE, siim_root / "test" / "x" / "nameless.dcm", "PN")
    ds = pydicom.dcmread(nameless)
    del ds.StudyInstanceUID
    ds.save_as(nameless)
    table = load_siim(siim_root)
    study = table.items.set_index("image_id")["study_id"]
    assert study[["i1", "i2", "i3"]].tolist() == ["S1", "S1", "S2"] and study["u1"] == "S9" and study["flat"] == "1.2.3.4"
    q = table.quarantine
    assert q["image_id"].tolist() == ["nameless"] and "cannot tell the study of this image" in q["problem"].iloc[0]


def test_folder_scans_name_what_they_cannot_read_and_list_tiff(vinbig_root, caplog):
    """The unlabeled folder: a TIFF is an image (the reader decodes it), a dangling link and a folder
    named like an image are quarantined, a text file is not an image (one log line), a hidden file
    is skipped."""
    Image.fromarray(np.full((48, 64), 90, np.uint8)).save(vinbig_root / "test" / "scan.tif")
    (vinbig_root / "test" / "gone.dicom").symlink_to(vinbig_root / "nowhere.dicom")
    (vinbig_root / "test" / "folder.png").mkdir()
    (vinbig_root / "test" / "notes.txt").write_text("x")
    (vinbig_root / "test" / ".DS_Store").write_text("x")
    with caplog.at_level("WARNING"):
        table = load_vinbigdata(vinbig_root)
    assert "scan" in set(table.with_role("unlabeled")["image_id"])
    problems = dict(zip(table.quarantine["image_id"], table.quarantine["problem"]))
    assert set(problems) == {"gone", "folder"}
    assert problems["gone"].startswith("dangling link:") and "is a folder, not an image file" in problems["folder"]
    assert "1 files are not images by their suffix" in caplog.text and "notes.txt" in caplog.text
