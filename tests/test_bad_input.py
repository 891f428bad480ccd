"""Bad input, the user's view: every kind through the entry points a user hits.

tests/test_readers.py and tests/test_adapters.py test the readers and each adapter row by row; this
file is the matrix of what a user can feed the engine, run through the run's data stage
(``teacher_student.cycle.data_stage.prepare``: ``load_dataset`` + the preprocessing cache + folds), through
``load_dataset(DataConfig(...))`` and, for a few kinds, through ``python run_cycle.py --config``.

Every bad kind ends in exactly one of two ways: one DataError line (which file, which row, what), or a
quarantine entry in ``table.quarantine`` and so in ``<run>/data/quarantine.csv`` -- and the rows
in always equal the rows kept plus the rows quarantined. Problems a header shows (and every CSV
problem) are caught by the adapters and name the CSV row; problems only decoding shows (a truncated
file, a missing JPEG decoder) are caught by the cache and name the image file.

Policy for DICOMs that are not radiographs (CT, MR, NM...): quarantined by every adapter
(``datasets.adapters.common.ACCEPTED_MODALITIES``); OT/SC/no modality are accepted, as digitised films
carry them. Input that is unusual but fine (16-bit PNG, a spreadsheet's CSV) must simply load.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cxr_noisy_student.datasets.adapters import load_dataset
from cxr_noisy_student.datasets.cache import ImageCache
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.teacher_student.cycle.data_stage import prepare
from cxr_noisy_student.datasets.atomic import read_json
from cxr_noisy_student.teacher_student.config import EngineConfig, RunConfig
from cxr_noisy_student.datasets.config import DataConfig, FoldConfig, PreprocessConfig
from test_adapters import SIIM_FILE, VINBIG_ROWS, _dicom, _png, _write, vinbig_root  # noqa: F401 (fixture)
from test_readers import _truncated_png

ROOT = Path(__file__).resolve().parents[1]
REAL_PNGS = ("cxr_0221", "cxr_0232", "cxr_0317", "cxr_0230", "cxr_0231", "cxr_0154")
"""Six small real radiographs of the shared set (different films, so two folds can be made)."""
IMAGES_HEADER = "image_id,path,patient_id,label,role"
LABELS_HEADER = "image_id,box_class,x_min,y_min,x_max,y_max"
PREPROCESS = PreprocessConfig(size=32)
HAS_LIBJPEG = importlib.util.find_spec("libjpeg") is not None


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _append(path: Path, line: str) -> int:
    """Append one CSV line; return its line number (the header is line 1, as in the quarantine)."""
    lines = [*_lines(path), line]
    _write(path, lines)
    return len(lines)


def make_root(base: Path, cxr_dir: Path) -> Path:
    """A generic-format data root: six real PNGs, labels sick/well, one box, one 'no boxes' marker."""
    data = base / "data"
    (data / "images").mkdir(parents=True)
    rows = [IMAGES_HEADER]
    for i, name in enumerate(REAL_PNGS):
        shutil.copy(cxr_dir / "images" / f"{name}.png", data / "images" / f"g{i}.png")
        rows.append(f"g{i},images/g{i}.png,p{i},{('sick', 'well')[i % 2]},")
    _write(data / "images.csv", rows)
    _write(data / "labels.csv", [LABELS_HEADER, "g0,lesion,8,12,40,36", "g1,,,,,"])
    return data


@pytest.fixture
def root(tmp_path, cxr_dir) -> Path:
    return make_root(tmp_path, cxr_dir)


def data_config(root: Path, mode: str = "quarantine") -> DataConfig:
    return DataConfig(format="generic", root=str(root), images_csv="images.csv", labels_csv="labels.csv",
                      study_label_column="label", study_classes=("sick", "well"), normal_class="well",
                      box_classes=("lesion",), on_bad_input=mode)


def engine_config(root: Path, out: Path, mode: str = "quarantine") -> EngineConfig:
    return EngineConfig(data=data_config(root, mode), preprocess=PREPROCESS, folds=FoldConfig(k=2),
                        run=RunConfig(out=str(out), workers=0, device="cpu"))


def data_stage(root: Path, out: Path):
    """The run's data stage in quarantine mode; the table it saved (read back from <out>/data)."""
    return prepare(engine_config(root, out)).table


def stage_error(root: Path, out: Path) -> str:
    """The one-line DataError the data stage raises in error mode."""
    with pytest.raises(DataError) as info:
        prepare(engine_config(root, out, "error"))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def check_accounting(root: Path, table, out: Path) -> None:
    """images.csv rows = kept + quarantined; labels.csv rows = boxes + markers + quarantined.

    Rows the adapters reject name their CSV; an image the cache cannot decode is one entry naming
    the image file (row empty), and its label rows leave with it.
    """
    q = table.quarantine
    images_csv, labels_csv = str(root / "images.csv"), str(root / "labels.csv")
    undecodable = q[~q["file"].isin([images_csv, labels_csv])]
    assert undecodable["row"].isna().all()
    images_in = len(pd.read_csv(images_csv, dtype=str))
    assert images_in == len(table.items) + int((q["file"] == images_csv).sum()) + len(undecodable)
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    kept = set(table.items["image_id"])
    markers = int(((labels["box_class"] == "") & labels["image_id"].isin(kept)).sum())
    went_with_image = int(labels["image_id"].isin(set(undecodable["image_id"])).sum())
    assert len(labels) == len(table.boxes) + markers + int((q["file"] == labels_csv).sum()) + went_with_image
    on_disk = pd.read_csv(out / "data" / "quarantine.csv")
    assert len(on_disk) == len(q) and list(on_disk["problem"]) == list(q["problem"])


# ---------------------------------------------------------------------------- bad files and rows


def _file_row(root: Path, name: str, write=_png, label: str = "sick", image_id: str = "bad",
              role: str = "") -> tuple[str, int]:
    """Write images/<name> with ``write`` and list it in images.csv; (csv name, its line)."""
    write(root / "images" / name)
    return "images.csv", _append(root / "images.csv", f"{image_id},images/{name},p9,{label},{role}")


def _dicom_copy(src: Path, dest: Path, **tags) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(dest)
    return dest


def _truncated_dicom(dicom_dir: Path, dest: Path) -> None:
    """The real CR radiograph cut in half: its header reads, its pixel data ends early."""
    data = (dicom_dir / SIIM_FILE).read_bytes()
    dest.write_bytes(data[: len(data) // 2])


def _escape_symlink(root: Path) -> str:
    outside = _png(root.parent / "outside" / "secret.png")
    (root / "images" / "link.png").symlink_to(outside)
    return "images/link.png"


def _escape_absolute(root: Path) -> str:
    return str(_png(root.parent / "outside" / "secret.png").resolve())


def _labels(line: str):
    """A kind that appends one line to labels.csv."""
    return lambda root, dicom_dir: ("labels.csv", _append(root / "labels.csv", line))


def _images(line: str):
    """A kind that appends one line to images.csv (its file, if any, made beforehand)."""
    return lambda root, dicom_dir: ("images.csv", _append(root / "images.csv", line))


def _copy_of(name: str):
    return lambda dicom_dir: lambda dest: shutil.copy(dicom_dir / name, dest)


def _one_pixel(dest: Path) -> None:
    cv2.imwrite(str(dest), np.full((1, 1), 9, np.uint8))


# kind -> (make(root, dicom_dir) -> (CSV that gets the bad line, its line number), problem, stage);
# stage "adapter": the entry names that CSV and line; "cache": only decoding finds it, and the entry
# names the image file.
KINDS = {
    "corrupt DICOM": (lambda r, d: _file_row(r, "bad.dcm", lambda p: p.write_bytes(bytes(range(256)) * 4)),
                      "not a DICOM file", "adapter"),
    "truncated DICOM": (lambda r, d: _file_row(r, "bad.dcm", lambda p: _truncated_dicom(d, p)),
                        "file is truncated", "cache"),
    "corrupt PNG": (lambda r, d: _file_row(r, "bad.png", lambda p: p.write_bytes(b"not an image" * 40)),
                    "not a recognised image format", "adapter"),
    "truncated PNG": (lambda r, d: _file_row(r, "bad.png", lambda p: _truncated_png(d, p)),
                      "image file is truncated", "cache"),
    "missing file": (_images("bad,images/nothere.png,p9,sick,"), "missing image file", "adapter"),
    "unknown study class": (lambda r, d: _file_row(r, "bad.png", label="banana"), "unknown class 'banana'",
                            "adapter"),
    "unknown box class": (_labels("g0,tumour,8,12,40,36"), "unknown box class 'tumour'", "adapter"),
    "box outside the image": (_labels("g0,lesion,8,12,5000,36"), "lies outside the image", "adapter"),
    "inverted box": (_labels("g0,lesion,40,12,8,36"), "box is inverted", "adapter"),
    "NaN box": (_labels("g0,lesion,8,nan,40,36"), "missing/NaN coordinate", "adapter"),
    "empty box cell": (_labels("g0,lesion,8,,40,36"), "missing/NaN coordinate", "adapter"),
    "zero-area box": (_labels("g0,lesion,8,12,8,36"), "zero area", "adapter"),
    "duplicated image id": (lambda r, d: _file_row(r, "other.png", image_id="g0"),
                            "duplicated image id (first on row 2)", "adapter"),
    "labels for an absent image": (_labels("zz,lesion,8,12,40,36"), "labels for an absent image", "adapter"),
    "image without labels": (lambda r, d: _file_row(r, "bad.png", label="", role="labeled"),
                             "image without labels", "adapter"),
    "CT DICOM": (lambda r, d: _file_row(r, "bad.dcm", _copy_of("CT_small.dcm")(d)),
                 "DICOM modality CT is not a projection radiograph", "adapter"),
    "MR DICOM": (lambda r, d: _file_row(r, "bad.dcm", _copy_of("MR2_J2KI.dcm")(d)),
                 "DICOM modality MR is not a projection radiograph", "adapter"),
    "one-pixel image": (lambda r, d: _file_row(r, "bad.png", _one_pixel), "1x1 pixels, too small", "adapter"),
    "path ../../etc/passwd": (_images("bad,../../etc/passwd,p9,sick,"), "escapes the data root", "adapter"),
    "absolute path outside": (lambda r, d: _images(f"bad,{_escape_absolute(r)},p9,sick,")(r, d),
                              "escapes the data root", "adapter"),
    "symlink outside": (lambda r, d: _images(f"bad,{_escape_symlink(r)},p9,sick,")(r, d),
                        "escapes the data root", "adapter"),
}
if not HAS_LIBJPEG:  # with pylibjpeg-libjpeg installed the file decodes: see test_jpeg_lossy_dicom_...
    KINDS["JPEG-lossy DICOM, no decoder"] = (
        lambda r, d: _file_row(r, "bad.dcm", lambda p: _dicom_copy(d / "JPEG-lossy.dcm", p, Modality="CR")),
        "the decoder is not installed: pip install pylibjpeg-libjpeg", "cache")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_input_is_quarantined_and_named_or_stops_the_run_with_one_line(root, tmp_path, dicom_dir, kind):
    make, problem, stage = KINDS[kind]
    csv_name, line = make(root, dicom_dir)
    table = data_stage(root, tmp_path / "run")
    assert len(table.quarantine) == 1, table.quarantine.to_dict("records")
    entry = table.quarantine.iloc[0]
    assert problem in entry["problem"]
    if stage == "adapter":
        assert (entry["file"], int(entry["row"])) == (str(root / csv_name), line)
        where = f"{root / csv_name}, row {line}"
    else:  # only decoding found it: the entry names the image file
        assert Path(entry["file"]).name.startswith("bad.") and pd.isna(entry["row"]) and entry["image_id"] == "bad"
        where = f"{entry['file']} (image bad): "
    check_accounting(root, table, tmp_path / "run")
    message = stage_error(root, tmp_path / "run_error")
    assert message.startswith(where) and problem in message, message


def test_sixteen_bit_png_reads_by_its_dtype_not_as_an_error(root, tmp_path):
    """Left half 1000/65535 (dark), right half 51400/65535: cached as 4 and 200 of 255 -- not
    stretched to the image's own range, not clipped to 8 bits."""
    pixels = np.full((40, 60), 1000, np.uint16)
    pixels[:, 30:] = 51400
    cv2.imwrite(str(root / "images" / "g16.png"), pixels)
    assert Image.open(root / "images" / "g16.png").mode == "I;16"
    _append(root / "images.csv", "g16,images/g16.png,p16,sick,")
    table = data_stage(root, tmp_path / "run")
    assert table.quarantine.empty and "g16" in set(table.items["image_id"])
    cached = ImageCache(tmp_path / "run" / "cache", PREPROCESS).load("g16")
    assert cached.shape == (32, 32)
    assert set(np.unique(cached[:, :15])) == {4} and set(np.unique(cached[:, 17:])) == {200}
    check_accounting(root, table, tmp_path / "run")


@pytest.mark.skipif(not HAS_LIBJPEG, reason="pylibjpeg-libjpeg (GPL-3, opt-in) is not installed")
def test_jpeg_lossy_dicom_reads_when_its_decoder_is_installed(root, tmp_path, dicom_dir):
    _file_row(root, "bad.dcm", lambda p: _dicom_copy(dicom_dir / "JPEG-lossy.dcm", p, Modality="CR"))
    table = data_stage(root, tmp_path / "run")
    assert table.quarantine.empty and "bad" in set(table.items["image_id"])


@pytest.mark.parametrize("csv_name", ["images.csv", "labels.csv"])
@pytest.mark.parametrize("content, problem", [("", "the file is empty"),
                                              ("header", "the file has a header but no rows"),
                                              ("blank", "the file has a header but no rows")])
def test_empty_csv_stops_in_either_mode_with_one_line(root, csv_name, content, problem):
    header = _lines(root / csv_name)[0]
    (root / csv_name).write_text({"": "", "header": header + "\n", "blank": header + "\n\n  \n"}[content])
    for mode in ("quarantine", "error"):
        with pytest.raises(DataError) as info:
            load_dataset(data_config(root, mode))
        assert str(info.value).startswith(f"{root / csv_name}: {problem}") and "\n" not in str(info.value)


@pytest.mark.parametrize("csv_name, wrong, right", [("images.csv", "imageid", "image_id"),
                                                    ("labels.csv", "xmin", "x_min"),
                                                    ("labels.csv", "box class", "box_class")])
def test_wrong_column_names_say_which_and_did_you_mean(root, csv_name, wrong, right):
    lines = _lines(root / csv_name)
    _write(root / csv_name, [lines[0].replace(right, wrong), *lines[1:]])
    with pytest.raises(DataError) as info:
        load_dataset(data_config(root))
    message = str(info.value)
    assert message.startswith(f"{root / csv_name}: missing columns ['{right}']") and "\n" not in message
    assert f"did you mean '{wrong}' for '{right}'" in message


def test_spreadsheet_csv_loads_and_a_non_utf8_csv_stops_with_one_line(root):
    """A CSV saved by a spreadsheet (UTF-8 byte-order mark, CRLF line ends) reads like any other;
    one in another encoding stops with a line naming the file rather than a decoding traceback."""
    for name in ("images.csv", "labels.csv"):
        text = (root / name).read_text()
        (root / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    table = load_dataset(data_config(root))
    assert len(table.items) == 6 and len(table.boxes) == 1 and table.quarantine.empty
    assert table.items["patient_id"].tolist() == [f"p{i}" for i in range(6)]
    (root / "images.csv").write_bytes((root / "images.csv").read_bytes().replace(b"p1", b"p\xe91"))  # Latin-1 é
    with pytest.raises(DataError) as info:
        load_dataset(data_config(root))
    assert str(info.value).startswith(f"{root / 'images.csv'}: not a readable CSV: 'utf-8' codec can't decode")


def test_missing_csv_and_missing_root_stop_with_one_line(root, tmp_path):
    (root / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"labels.csv: file not found$"):
        load_dataset(data_config(root))
    with pytest.raises(DataError, match="data root not found"):
        load_dataset(data_config(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- one policy for modalities


def test_non_radiograph_dicoms_are_quarantined_by_every_adapter(vinbig_root, dicom_dir):
    """VinBigData layout: an MR listed in train.csv and a CT in the unlabeled pool are both set
    aside with their modality named; CR radiographs and PNGs load as before."""
    _dicom(dicom_dir / "MR2_J2KI.dcm", vinbig_root / "train" / "m.dicom", "PAT-M")
    shutil.copy(dicom_dir / "CT_small.dcm", vinbig_root / "test" / "ct.dicom")
    shutil.copy(dicom_dir / "vlut_04.dcm", vinbig_root / "test" / "ot.dicom")  # OT: accepted
    csv = _write(vinbig_root / "train.csv", [*VINBIG_ROWS, "m,Nodule/Mass,8,R1,10,10,50,50",
                                              "m,Atelectasis,1,R2,5,5,30,30"])
    table = load_dataset(DataConfig(format="vinbigdata", root=str(vinbig_root)))
    q = table.quarantine
    mr, ct = q[q["image_id"] == "m"], q[q["image_id"] == "ct"]
    assert len(q) == 3 and list(mr["row"]) == [len(VINBIG_ROWS) + 1, len(VINBIG_ROWS) + 2]  # one per row
    assert (mr["file"] == str(csv)).all() and ct["file"].tolist() == [str(vinbig_root / "test" / "ct.dicom")]
    assert all("modality MR is not a projection radiograph" in p for p in mr["problem"])
    assert "modality CT is not a projection radiograph" in ct["problem"].iloc[0] and ct["row"].isna().all()
    assert set(table.items["image_id"]) == {"a", "b", "c", "d", "e", "ot"}
    train_rows = len(pd.read_csv(csv, dtype=str))
    no_finding = 3  # rows of kept images without a box (class 14)
    raw_boxes = int((table.boxes["source"] != "wbf").sum())
    assert train_rows == raw_boxes + no_finding + int((table.quarantine["file"] == str(csv)).sum())
    with pytest.raises(DataError, match=rf"train.csv, row {len(VINBIG_ROWS) + 1} \(image m\): .*modality MR"):
        load_dataset(DataConfig(format="vinbigdata", root=str(vinbig_root), on_bad_input="error"))


# ---------------------------------------------------------------------------- a run with bad rows


def test_run_with_quarantined_rows_completes_the_data_stage_and_reports_them(root, tmp_path, dicom_dir, caplog):
    """Several kinds at once: the data stage finishes, folds cover only kept labeled images,
    data/quarantine.csv lists every rejected row and file, the log says so, a rerun reuses it."""
    _file_row(root, "trunc.png", lambda p: _truncated_png(dicom_dir, p))
    _append(root / "images.csv", "evil,../../etc/passwd,p9,sick,")
    _append(root / "images.csv", "g0,images/g1.png,p9,sick,")
    shutil.copy(dicom_dir / "MR2_J2KI.dcm", root / "images" / "mr.dcm")
    _append(root / "images.csv", "mr,images/mr.dcm,p8,well,")
    _append(root / "labels.csv", "g2,lesion,40,12,8,36")
    _append(root / "labels.csv", "bad,lesion,8,12,40,36")  # box of the image the cache cannot decode
    with caplog.at_level(logging.WARNING, logger="cxr.cycle"):
        run = prepare(engine_config(root, tmp_path / "run"))
    out = tmp_path / "run" / "data"
    assert read_json(tmp_path / "run" / "data.done.json")["result"]["quarantined"] == 5
    problems = pd.read_csv(out / "quarantine.csv")["problem"].tolist()
    for expected in ("image file is truncated", "escapes the data root", "duplicated image id", "modality MR",
                     "box is inverted"):
        assert sum(expected in p for p in problems) == 1, (expected, problems)
    assert set(run.folds.index) == {f"g{i}" for i in range(6)} and set(run.folds) == {0, 1}
    assert "5 input rows/files quarantined (see data/quarantine.csv)" in caplog.text
    check_accounting(root, run.table, tmp_path / "run")
    again = prepare(engine_config(root, tmp_path / "run"))
    assert again.records[0]["skipped"] and len(again.table.quarantine) == 5


# ---------------------------------------------------------------------------- the command line


# Each command line pays ~5 s of imports (torch, timm, ultralytics): two kinds here -- a whole-file
# problem that stops even in quarantine mode, and a row problem in error mode; the in-process
# matrix above checks the error-mode line of every kind.
CLI_CASES = {
    "wrong column": ("quarantine", lambda r: _write(r / "images.csv", [IMAGES_HEADER.replace("image_id", "imageid"),
                                                                         *_lines(r / "images.csv")[1:]]),
                     ["images.csv: missing columns ['image_id']", "did you mean 'imageid' for 'image_id'"]),
    "path escape, error mode": ("error", lambda r: _append(r / "images.csv", "evil,../../etc/passwd,p9,sick,"),
                                ["images.csv, row 8 (image evil):", "'../../etc/passwd' escapes the data root"]),
}


@pytest.fixture(scope="module", autouse=True)
def cli_procs(tmp_path_factory, cxr_dir):
    """Start every command-line case before the module's first test, so that their ~5 s of imports
    each overlap with the in-process tests; the command-line tests collect them at the end."""
    procs = {}
    for i, (case, (mode, spoil, _)) in enumerate(sorted(CLI_CASES.items())):
        base = tmp_path_factory.mktemp(f"cli{i}")
        data = make_root(base, cxr_dir)
        spoil(data)
        config = base / "x.yaml"
        config.write_text(f"data:\n  format: generic\n  root: {data}\n  images_csv: images.csv\n"
                          f"  labels_csv: labels.csv\n  study_label_column: label\n  on_bad_input: {mode}\n"
                          f"preprocess:\n  size: 32\nfolds:\n  k: 2\nrun:\n  out: {base / 'run'}\n  device: cpu\n")
        procs[case] = (data, subprocess.Popen([sys.executable, "run_cycle.py", "--config", str(config)], cwd=ROOT,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_command_line_bad_input_is_one_error_line_and_exit_code_2(cli_procs, case):
    data, proc = cli_procs[case]
    stdout, stderr = proc.communicate(timeout=180)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}"), stderr
    assert all(part in lines[0] for part in CLI_CASES[case][2]), lines[0]
    assert "Traceback" not in stdout + stderr
