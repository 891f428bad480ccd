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

import csv
import dataclasses
import importlib.util
import logging
import re
import shutil
import struct
import subprocess
import sys
import zlib
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
    images_in = _records(images_csv)
    assert images_in == len(table.items) + int((q["file"] == images_csv).sum()) + len(undecodable)
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    kept = set(table.items["image_id"])
    markers = int(((labels["box_class"] == "") & labels["image_id"].isin(kept)).sum())
    went_with_image = int(labels["image_id"].isin(set(undecodable["image_id"])).sum())
    assert len(labels) == len(table.boxes) + markers + int((q["file"] == labels_csv).sum()) + went_with_image
    on_disk = pd.read_csv(out / "data" / "quarantine.csv")
    assert len(on_disk) == len(q) and list(on_disk["problem"]) == list(q["problem"])


def _records(path: str) -> int:
    """Data rows of a CSV (non-blank records after the header), read as the csv module reads them."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return sum(1 for cells in list(csv.reader(f))[1:] if any(c.strip() for c in cells))


# ---------------------------------------------------------------------------- bad files and rows


def _file_row(root: Path, name: str, write=_png, label: str = "sick", image_id: str = "bad",
              role: str = "", row: str | None = None) -> tuple[str, int]:
    """Write images/<name> with ``write`` and list it in images.csv (or ``row``); (csv name, its line)."""
    write(root / "images" / name)
    return "images.csv", _append(root / "images.csv", row or f"{image_id},images/{name},p9,{label},{role}")


def _bomb_png(dest: Path) -> None:
    """A PNG whose header claims 100000 x 100000 pixels (10 GB decoded) in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    dest.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _uncompressed(dicom_dir: Path, frames: int = 1) -> pydicom.Dataset:
    """The real CR radiograph (256 x 256 of it) stored uncompressed, with ``frames`` frames."""
    ds = pydicom.dcmread(dicom_dir / SIIM_FILE)
    frame = ds.pixel_array[:256, :256]
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.Rows, ds.Columns = frame.shape
    ds.PixelData = np.stack([frame if f % 2 == 0 else 255 - frame for f in range(frames)]).astype(frame.dtype).tobytes()
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _edited_dicom(dicom_dir: Path, dest: Path, how: str) -> None:
    """The real CR radiograph without its pixel data, or with 100 bytes of it missing."""
    ds = _uncompressed(dicom_dir)
    if how == "no pixels":
        del ds.PixelData
    else:
        ds.PixelData = ds.PixelData[:-100]
    ds.save_as(dest)


def _box_on_unlabeled(root: Path) -> tuple[str, int]:
    _file_row(root, "pool.png", label="", image_id="pool", role="unlabeled")
    return "labels.csv", _append(root / "labels.csv", "pool,lesion,8,12,40,36")


def _after_multiline(root: Path) -> tuple[str, int]:
    """A good row whose quoted patient cell spans two lines, then a bad row: the bad row's number
    is the line an editor shows, not the record count."""
    _append(root / "images.csv", 'q1,images/g0.png,"patient\nnine",sick,')
    return "images.csv", _append(root / "images.csv", "bad,images/nothere.png,p9,sick,")  # line 10, record 9


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
    # ids and paths: validated once, at load (an id becomes a file name in exports)
    "id with a slash": (_images("a/b,images/g0.png,p9,sick,"), "cannot be a file name", "adapter"),
    "id '..'": (_images("..,images/g0.png,p9,sick,"), "cannot be a file name", "adapter"),
    "id of 300 characters": (_images(f"{'x' * 300},images/g0.png,p9,sick,"), "300 bytes long", "adapter"),
    "empty image id": (_images(",images/g0.png,p9,sick,"), "empty image_id", "adapter"),
    "path with '..' inside the root": (_images("bad,images/../images/g0.png,p9,sick,"), "'..' is not allowed",
                                       "adapter"),
    "folder named like an image": (lambda r, d: _file_row(r, "bad.png", lambda p: p.mkdir()),
                                   "is a folder, not an image file", "adapter"),
    "dangling link": (lambda r, d: _file_row(r, "bad.png", lambda p: p.symlink_to(r / "images" / "gone.png")),
                      "dangling link", "adapter"),
    "link loop": (lambda r, d: _file_row(r, "bad.png", lambda p: p.symlink_to(p)), "dangling link", "adapter"),
    # files
    "zero-byte file": (lambda r, d: _file_row(r, "bad.png", lambda p: p.write_bytes(b"")), "file is empty (0 bytes)",
                       "adapter"),
    "decompression-bomb header": (lambda r, d: _file_row(r, "bad.png", _bomb_png), "decompression bomb", "adapter"),
    "DICOM without pixel data": (lambda r, d: _file_row(r, "bad.dcm", lambda p: _edited_dicom(d, p, "no pixels")),
                                 "DICOM has no pixel data", "cache"),
    "DICOM pixel-data length mismatch": (lambda r, d: _file_row(r, "bad.dcm", lambda p: _edited_dicom(d, p, "short")),
                                         "cannot decode pixel data", "cache"),
    # numbers and classes
    "negative coordinate": (_labels("g0,lesion,-5,12,40,36"), "lies outside the image", "adapter"),
    "text coordinate": (_labels("g0,lesion,eight,12,40,36"), "are not all numbers", "adapter"),
    "'1_0' coordinate (Python reads 10)": (_labels("g0,lesion,1_0,12,40,36"), "are not all numbers", "adapter"),
    "box class in another case": (_labels("g0,Lesion,8,12,40,36"), "unknown box class 'Lesion' (box classes: "
                                  "['lesion']); did you mean 'lesion'?", "adapter"),
    "study class in another case": (lambda r, d: _file_row(r, "bad.png", label="Sick"),
                                    "unknown class 'Sick' in column 'label' (study classes: ['sick', 'well']); "
                                    "did you mean 'sick'?", "adapter"),
    "duplicated label row": (_labels("g0,lesion,8,12,40,36"), "duplicated label row (identical to row 2)", "adapter"),
    "box on an image of role unlabeled": (lambda r, d: _box_on_unlabeled(r), "a box label for an image of role "
                                          "'unlabeled'", "adapter"),
    # CSV structure
    "short CSV row": (lambda r, d: _file_row(r, "bad.png", row="bad,images/bad.png,p9"),
                      "row has 3 cells, the header has 5", "adapter"),
    "long CSV row": (lambda r, d: _file_row(r, "bad.png", row="bad,images/bad.png,p9,sick,,extra"),
                     "row has 6 cells, the header has 5", "adapter"),
    "bad row after a quoted multi-line cell": (lambda r, d: _after_multiline(r), "missing image file", "adapter"),
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


# ---------------------------------------------------------------------------- unusual but fine: loads as is


def _pil_png(mode: str):
    def write(dest: Path) -> None:
        pixels = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
        image = Image.fromarray(pixels)
        if mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE)
        elif mode == "1":
            image = image.point(lambda v: 255 if v > 127 else 0).convert("1")
        else:
            image = image.convert(mode)
        image.save(dest, format={"tif": "TIFF", "bmp": "BMP"}.get(dest.suffix[1:], "PNG"))
    return write


def _jpeg_named_png(dest: Path) -> None:
    ok, buf = cv2.imencode(".jpg", (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8))
    dest.write_bytes(buf.tobytes())


def _multi_frame(dicom_dir: Path):
    return lambda dest: _uncompressed(dicom_dir, frames=2).save_as(dest)


def _semicolons(root: Path) -> str:
    for name in ("images.csv", "labels.csv"):
        (root / name).write_text((root / name).read_text().replace(",", ";"))
    return "g0"


# kind -> make(root, dicom_dir) -> the image id that must load (nothing quarantined)
ACCEPTED = {
    "id 'NA' (pandas reads it as missing)": lambda r, d: _file_row(r, "na.png", image_id="NA") and "NA",
    "id 'null' and patient 'nan'": lambda r, d: _file_row(r, "x.png", row="null,images/x.png,nan,sick,") and "null",
    "id with spaces": lambda r, d: _file_row(r, "x.png", image_id="film 7 left") and "film 7 left",
    "unicode id": lambda r, d: _file_row(r, "x.png", image_id="röntgen_bild_ä") and "röntgen_bild_ä",
    "quoted comma in a cell": lambda r, d: _file_row(r, "x.png", row='qc,images/x.png,"smith, john",sick,') and "qc",
    "empty patient id (its own patient)": lambda r, d: _file_row(r, "x.png", row="own,images/x.png,,sick,") and "own",
    "semicolon-separated CSVs": lambda r, d: _semicolons(r),
    "PNG that is a JPEG": lambda r, d: _file_row(r, "bad.png", _jpeg_named_png) and "bad",
    "palette PNG": lambda r, d: _file_row(r, "bad.png", _pil_png("P")) and "bad",
    "1-bit PNG": lambda r, d: _file_row(r, "bad.png", _pil_png("1")) and "bad",
    "RGBA PNG": lambda r, d: _file_row(r, "bad.png", _pil_png("RGBA")) and "bad",
    "TIFF": lambda r, d: _file_row(r, "bad.tif", _pil_png("L")) and "bad",
    "BMP": lambda r, d: _file_row(r, "bad.bmp", _pil_png("L")) and "bad",
    "multi-frame DICOM (frame 0 is read)": lambda r, d: _file_row(r, "bad.dcm", _multi_frame(d)) and "bad",
}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_unusual_but_valid_input_loads_through_the_data_stage(root, tmp_path, dicom_dir, kind):
    image_id = ACCEPTED[kind](root, dicom_dir)
    table = data_stage(root, tmp_path / "run")  # read back from <run>/data: ids survive the CSV round trip
    assert table.quarantine.empty, table.quarantine.to_dict("records")
    items = table.items.set_index("image_id")
    assert image_id in items.index and items.loc[image_id, "patient_id"] == {"own": "own", "null": "nan", "qc": "smith, john"}.get(
        image_id, items.loc[image_id, "patient_id"])
    assert ImageCache(tmp_path / "run" / "cache", PREPROCESS).load(image_id).shape == (32, 32)
    check_accounting(root, table, tmp_path / "run") if kind != "semicolon-separated CSVs" else None


def test_a_link_inside_the_root_is_followed_and_said_once(root, tmp_path, caplog):
    """The Kaggle way: the images folder is a link to a read-only input elsewhere. Every image
    loads (the old rule rejected all of them as escaping the root), and one log line says so."""
    elsewhere = tmp_path / "kaggle_input" / "images"
    shutil.move(root / "images", elsewhere)
    (root / "images").symlink_to(elsewhere)
    with caplog.at_level(logging.INFO):
        table = data_stage(root, tmp_path / "run")
    assert table.quarantine.empty and len(table.items) == 6
    said = [r.getMessage() for r in caplog.records if "links that lead outside the data root" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("6 of 6 images are reached through links"), said
    (root / "loop").symlink_to(root)  # a link loop and a dangling link anywhere under the root
    (root / "gone").symlink_to(tmp_path / "nowhere")
    assert len(data_stage(root, tmp_path / "run2").items) == 6  # the source digest walks past both


# ---------------------------------------------------------------------------- whole-input problems: one line


def _keep_rows(root: Path, keep) -> None:
    lines = _lines(root / "images.csv")
    _write(root / "images.csv", [lines[0], *[line for i, line in enumerate(lines[1:]) if keep(i, line)]])


ONE_LINE = {  # kind -> (spoil(root), config changes, the line: file and problem)
    "missing label column": (lambda r: _write(r / "images.csv", [line.rsplit(",", 2)[0] + ",," if i else
                                                                  "image_id,path,patient_id,lbl,role"
                                                                  for i, line in enumerate(_lines(r / "images.csv"))]),
                             {}, "images.csv: missing columns ['label'] (did you mean 'lbl' for 'label'?)"),
    "column named twice": (lambda r: _write(r / "images.csv", [_lines(r / "images.csv")[0].replace("role", "label"),
                                                                *_lines(r / "images.csv")[1:]]),
                           {}, "images.csv: column(s) ['label'] appear twice in the header"),
    "Lesion next to lesion (classes read from the data)": (
        lambda r: _append(r / "labels.csv", "g2,Lesion,8,12,40,36"), {"box_classes": ()},
        "labels.csv: box classes 'Lesion' (row 4) and 'lesion' (row 2) differ only in case or spacing"),
    "one study class only": (lambda r: _write(r / "images.csv", [line.replace("well", "sick") for line in
                                                                  _lines(r / "images.csv")]), {"study_classes": (), "normal_class": ""},
                             "the 6 labeled images with a study label hold only 'sick'"),
    "one labeled image": (lambda r: _keep_rows(r, lambda i, _: i == 0), {},
                          "the 1 labeled images with a study label hold only 'sick'"),
    "more folds than patients": (lambda r: None, {"k": 7},
                                 "folds.k=7: the 6 labeled images form only 6 patient/duplicate groups"),
    "every image quarantined": (lambda r: _write(r / "images.csv", [line.replace("images/", "../images/") for line in
                                                                     _lines(r / "images.csv")]), {},
                                "data: 6 of 6 image ids were quarantined and no labeled image is left (top reasons: 6x "
                                "image path '…' escapes the data root …"),
    "unclosed quote": (lambda r: _append(r / "images.csv", 'bad,"images/x.png,p9,sick,'), {},
                       "images.csv, row 8: not readable CSV (unexpected end of data)"),
}


@pytest.mark.parametrize("kind", sorted(ONE_LINE))
def test_whole_input_problems_stop_with_one_line_in_either_mode(root, tmp_path, kind):
    """Problems of the whole input stop in quarantine mode too, with the line below (error mode
    may already stop at the first bad row); never a traceback, never a run on what is left."""
    spoil, changes, message = ONE_LINE[kind]
    spoil(root)
    changes = dict(changes)
    folds = FoldConfig(k=changes.pop("k", 2))
    for mode in ("quarantine", "error"):
        cfg = engine_config(root, tmp_path / f"run_{mode}", mode)
        data = dataclasses.replace(cfg.data, **changes)
        with pytest.raises(DataError) as info:
            prepare(dataclasses.replace(cfg, data=data, folds=folds))
        text = str(info.value)
        assert "\n" not in text and "Traceback" not in text, text
        if mode == "quarantine":  # error mode may stop earlier, at the first bad row
            assert message in text, text


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
    assert str(info.value) == (f"{root / 'images.csv'}, row 3: not UTF-8 text (byte 0xe9); save the file as UTF-8 "
                               "(spreadsheets: 'CSV UTF-8')")


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
    assert "row nan" not in caplog.text and not re.search(r"row \d+\.0", caplog.text)  # rows read back as integers
    assert str(run.table.quarantine["row"].dtype) == "Int64"
    check_accounting(root, run.table, tmp_path / "run")
    again = prepare(engine_config(root, tmp_path / "run"))
    assert again.records[0]["skipped"] and len(again.table.quarantine) == 5


def test_a_box_only_labeled_image_is_not_a_classifier_target_but_is_predicted(root, tmp_path):
    """load_generic accepts a labeled image with boxes and no study label; the classifier must not
    train on its NaN target (it did, and the loss went NaN), yet must predict it: the detector's
    negatives and the gate read P(abnormal) of every image."""
    from cxr_noisy_student.teacher_student.tasks.classifier import ClassifierTask

    _file_row(root, "boxonly.png", label="", image_id="boxonly", role="labeled")
    _append(root / "labels.csv", "boxonly,lesion,8,12,40,36")
    ctx = prepare(engine_config(root, tmp_path / "run"))
    task = ClassifierTask(ctx)
    assert "boxonly" in ctx.labeled_ids and "boxonly" not in task.labeled_ids() and "boxonly" in task.pool_ids()
    for plan in task.fold_plans(0, None, None):
        assert "boxonly" not in plan.train_ids and np.isfinite(plan.train.targets).all()


@pytest.mark.parametrize("policy", ["exclude", "report"])
def test_a_test_image_that_copies_a_training_image_is_reported_and_by_default_not_scored(root, tmp_path, policy):
    shutil.copy(root / "images" / "g0.png", root / "images" / "copy.png")  # filed under another patient
    _append(root / "images.csv", "copy,images/copy.png,p77,sick,test")
    _append(root / "images.csv", "fresh,images/g5.png,p78,well,test")  # g5's file again, under another id: also a copy
    cfg = engine_config(root, tmp_path / "run")
    ctx = prepare(dataclasses.replace(cfg, folds=dataclasses.replace(cfg.folds, test_duplicates=policy)))
    report = read_json(tmp_path / "run" / "data" / "fold_report.json")
    assert report["test_duplicates_of_training"] == ["copy", "fresh"]
    assert {"image_a": "g0", "role_a": "labeled", "image_b": "copy", "role_b": "test"} in report["cross_role_pairs"]
    assert ctx.scored_test_ids() == ([] if policy == "exclude" else ["copy", "fresh"])


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
