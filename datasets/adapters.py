"""Dataset formats -> the canonical :class:`datasets.table.ItemTable`.

Every supported layout (Kaggle VinBigData, Kaggle SIIM-COVID19, a generic images folder + CSV, and
the built-in demo, which uses the VinBigData layout) ends in the same table, so nothing after this
module knows which format the data came from.

Every input row is checked, and a bad one goes through one :class:`~datasets.table.Quarantine`
(``on_bad_input``: set aside and reported, or the first one stops the run with a one-line
:class:`~datasets.errors.DataError`). Nothing is dropped silently: each rejected row appears in
``table.quarantine`` with its file and its CSV line number (the header is line 1, the number a
person sees in an editor or spreadsheet).

Checked everywhere: boxes outside the image, inverted, zero-area or NaN (after normalising by the
size read from the image header), unknown classes, missing or unreadable image files, duplicated
image ids, labels for images that are not there, labeled images without labels, image paths that
escape the data root, empty CSVs and wrong column names (with a "did you mean"), images smaller
than ``readers.MIN_SIDE`` and DICOMs that are not radiographs (:data:`ACCEPTED_MODALITIES`).
Problems only decoding finds (a truncated file, a missing JPEG decoder) are quarantined by the
preprocessing cache in the run's data stage (``teacher_student.cycle.data_stage.prepare``).
"""
from __future__ import annotations

import ast
import difflib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pydicom
from ensemble_boxes import weighted_boxes_fusion

from .boxes import BOX_COLUMNS, box_problem, from_pixels
from .readers import MIN_SIDE, RADIOGRAPH_MODALITIES, image_size, is_dicom, pseudonymize
from .errors import DataError
from .table import (
    BOX_TABLE_COLUMNS,
    ROLES,
    ItemTable,
    Quarantine,
    empty_boxes,
    label_column,
)

log = logging.getLogger(__name__)

VINBIG_BOX_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)
VINBIG_NO_FINDING_ID = 14
VINBIG_CLASS_NAMES = (*VINBIG_BOX_CLASSES, "No finding")
VINBIG_STUDY_CLASSES = ("No finding", "Abnormal")
VINBIG_NORMAL_CLASS = VINBIG_STUDY_CLASSES[0]
VINBIG_COLUMNS = ("image_id", "class_id", *BOX_COLUMNS)
SIIM_STUDY_CLASSES = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
SIIM_BOX_CLASSES = ("opacity",)
CXR_COVID_STUDY_CLASSES = ("COVID-19", "Other pneumonia/abnormal", "No Finding")
CXR_COVID_BOX_CLASSES = ("Right Lung", "Left Lung")
FUSED_SOURCE = "wbf"
"""``source`` of the boxes fused across radiologists; raw boxes keep their radiologist id."""
IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dicom", ".dcm")
GENERIC_LABEL_COLUMNS = ("image_id", "box_class", *BOX_COLUMNS)
ACCEPTED_MODALITIES = RADIOGRAPH_MODALITIES | {"", "OT", "SC"}
"""DICOM modalities every adapter accepts: projection radiographs (CR, DX, RG), and no modality, OT
(other) or SC (secondary capture), which digitised films and PNG-to-DICOM conversions carry. Any
other DICOM (CT, MR, NM, US, MG, PT...) is quarantined like any bad row: the reader can decode it,
but a cross-sectional slice or a nuclear-medicine frame in a chest-radiograph set is a mistake that
would teach the models the wrong kind of image. PNG/JPEG files carry no modality and are accepted."""


# ---------------------------------------------------------------------------- CSV + paths


def read_csv_checked(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV as stripped text cells ('' when empty) plus a ``_row`` column of line numbers.

    Why text: numbers are parsed row by row, so one bad cell quarantines one row instead of failing
    the whole file or silently becoming NaN. Blank lines carry no data and are skipped (they still
    count for the line numbers). A quoted cell spanning several lines would shift the numbers after
    it; none of the supported formats has one.

    Raises:
        DataError: the file is missing, empty, unreadable or lacks a required column.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty (expected columns {list(required)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV: {str(exc).strip().splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    check_columns(path, list(df.columns), required)
    df = df.apply(lambda col: col.str.strip())
    df.insert(0, "_row", np.arange(len(df)) + 2)
    df = df[(df.drop(columns="_row") != "").any(axis=1)].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    return df


def check_columns(path: Path, found: list[str], required: Sequence[str]) -> None:
    """Raise a one-line DataError naming the missing columns, a close match, and what was found."""
    missing = [c for c in required if c not in found]
    if not missing:
        return
    hints = [f"'{m[0]}' for '{c}'" for c in missing if (m := difflib.get_close_matches(c, found, n=1, cutoff=0.6))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise DataError(f"{path}: missing columns {missing}{hint}; found columns {found}")


def _number(text: str) -> float:
    """'' -> NaN, else float(text); ValueError for text that is not a number."""
    return float(text) if text != "" else float("nan")


def _normalized_box(cells: Sequence[str], width: int, height: int) -> tuple[np.ndarray | None, str | None]:
    """Pixel x_min, y_min, x_max, y_max cells -> (normalized box, None) or (None, why it is bad)."""
    try:
        values = [_number(c) for c in cells]
    except ValueError:
        return None, f"box coordinates {list(cells)} are not all numbers"
    box = from_pixels(values, width, height)[0]
    problem = box_problem(*(float(v) for v in box))
    if problem:
        return None, f"{problem} (pixels {values}, image {width}x{height})"
    return box, None


def _resolved_root(root: str | Path) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return root


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks and '..' resolved) lies inside the resolved ``root``."""
    return path.resolve().is_relative_to(root)


def _folder(root: Path, name: str | None, required: bool) -> Path | None:
    """A folder of the data root; None when optional and absent (logged, never silent)."""
    if name is None:
        return None
    folder = (root / name).resolve()
    if not folder.is_relative_to(root):
        raise DataError(f"{root / name}: folder escapes the data root {root}")
    if folder.is_dir():
        return folder
    if required:
        raise DataError(f"{folder}: image folder not found")
    log.warning("%s: no such folder, so no images from it", folder)
    return None


def _index_images(folder: Path, root: Path, q: Quarantine, recursive: bool = False,
                  suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image id (file stem) -> resolved path for the image files of a folder.

    A second file with the same stem (``x.dicom`` and ``x.png``) and a link leading out of the
    data root are rejected, since either would make "which image is this?" ambiguous or unsafe.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if not _inside(root, path):
            q.reject(path, None, path.stem, f"image path escapes the data root {root}")
        elif path.stem in found:
            q.reject(path, None, path.stem, f"duplicated image id: {found[path.stem]} has the same id")
        else:
            found[path.stem] = path.resolve()
    return found


# ---------------------------------------------------------------------------- image headers


def _dicom_header(path: Path) -> tuple[str, str]:
    """(pseudonymized PatientID or '', Modality or ''); both '' when the file is not DICOM."""
    if not is_dicom(path):
        return "", ""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "Modality"], force=True)
    value = str(ds.get("PatientID", "") or "").strip()
    return (pseudonymize(value) if value else ""), str(ds.get("Modality", "") or "").strip().upper()


def _probe(path: Path) -> tuple[int, int, str] | str:
    """(width, height, patient id or '') from the image header, or why the image cannot be used."""
    try:
        width, height = image_size(path)
        if min(width, height) < MIN_SIDE:
            return f"{path}: image is {width}x{height} pixels, too small to be a radiograph (minimum {MIN_SIDE})"
        patient, modality = _dicom_header(path)
        if modality not in ACCEPTED_MODALITIES:
            accepted = ", ".join(sorted(m for m in ACCEPTED_MODALITIES if m))
            return f"{path}: DICOM modality {modality} is not a projection radiograph (accepted: {accepted} or none)"
        return int(width), int(height), patient
    except DataError as exc:
        return str(exc)
    except Exception as exc:  # pydicom's PatientID/Modality read: any header error is one quarantine line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{path}: cannot read the DICOM header ({type(exc).__name__}: {text})"


def _probe_all(paths: Sequence[Path]) -> dict[Path, tuple[int, int, str] | str]:
    """Headers of many files; threads because header reads wait on the disk, not the CPU."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return dict(zip(paths, pool.map(_probe, paths)))


# ---------------------------------------------------------------------------- building the table


@dataclass
class _Builder:
    """Collects images and boxes from several tables; refuses a second image with the same id."""

    study_classes: tuple[str, ...]
    box_classes: tuple[str, ...]
    q: Quarantine
    items: dict[str, dict] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    boxes: list[dict] = field(default_factory=list)

    def seen(self, image_id: str) -> str | None:
        """Where an image id was first loaded ("file, row n"), or None."""
        return self.where.get(image_id)

    def add_image(self, file: Path, row: int | None, *, image_id: str, patient_id: str, path: Path,
                  role: str, size: tuple[int, int], label: Sequence[float] | None, box_labeled: bool) -> bool:
        if image_id in self.items:
            self.q.reject(file, row, image_id, f"duplicated image id (first seen in {self.where[image_id]})")
            return False
        self.where[image_id] = f"{file}, row {row}" if row is not None else str(file)
        entry = {"image_id": image_id, "patient_id": patient_id, "path": str(path), "role": role,
                 "has_study_label": label is not None, "box_labeled": bool(box_labeled),
                 "width": int(size[0]), "height": int(size[1])}
        values = label if label is not None else [np.nan] * len(self.study_classes)
        entry.update({label_column(c): float(v) for c, v in zip(self.study_classes, values)})
        self.items[image_id] = entry
        return True

    def add_box(self, image_id: str, class_id: int, box: np.ndarray, source: str) -> None:
        self.boxes.append({"image_id": image_id, "class_id": int(class_id), **dict(zip(BOX_COLUMNS, box)),
                           "source": str(source), "score": 1.0})

    def table(self, label_mode: str, normal_class: str | None) -> ItemTable:
        columns = ["image_id", "patient_id", "path", "role", "has_study_label", "box_labeled", "width", "height",
                   *(label_column(c) for c in self.study_classes)]
        items = pd.DataFrame(list(self.items.values()), columns=columns)
        items = items.astype({"has_study_label": bool, "box_labeled": bool, "width": "int64", "height": "int64"})
        boxes = empty_boxes()
        if self.boxes:
            boxes = pd.DataFrame(self.boxes, columns=BOX_TABLE_COLUMNS).astype(empty_boxes().dtypes.to_dict())
        return ItemTable(items=items.reset_index(drop=True), boxes=boxes.reset_index(drop=True),
                         study_classes=tuple(self.study_classes), box_classes=tuple(self.box_classes),
                         label_mode=label_mode, normal_class=normal_class or None,
                         quarantine=self.q.frame()).validate()


def _add_unlabeled(b: _Builder, root: Path, folder: Path | None, role: str = "unlabeled",
                   recursive: bool = False, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> None:
    """Every image file of a folder, without labels (the pool the teachers pseudo-label)."""
    if folder is None:
        return
    files = _index_images(folder, root, b.q, recursive=recursive, suffixes=suffixes)
    for (image_id, path), probe in zip(files.items(), _probe_all(list(files.values())).values()):
        if isinstance(probe, str):
            b.q.reject(path, None, image_id, probe)
            continue
        b.add_image(path, None, image_id=image_id, patient_id=probe[2] or image_id, path=path, role=role,
                    size=probe[:2], label=None, box_labeled=False)


def _reject_unlisted(b: _Builder, files: dict[str, Path], listed: set[str], table: Path) -> None:
    """Image files that no row of ``table`` names: reported, since a labeled folder should be complete."""
    for image_id in sorted(set(files) - listed):
        b.q.reject(files[image_id], None, image_id, f"image file has no rows in {table}")


# ---------------------------------------------------------------------------- VinBigData


def training_boxes(table: ItemTable) -> pd.DataFrame:
    """The boxes detectors train on: per image the WBF-fused boxes when there are any, else the raw ones.

    VinBigData keeps every radiologist's boxes (``source`` = rad_id) next to the fused ones
    (``source`` = ``"wbf"``) so a caller can study agreement; training on both would count one
    finding several times, so the engine reads boxes through this function.
    """
    boxes = table.boxes
    fused = boxes["source"] == FUSED_SOURCE
    fused_images = set(boxes.loc[fused, "image_id"])
    return boxes[fused | ~boxes["image_id"].isin(fused_images)].reset_index(drop=True)


def fuse_radiologist_boxes(boxes: pd.DataFrame, *, iou_thr: float) -> pd.DataFrame:
    """Weighted Boxes Fusion of several readers' boxes, image by image (source ``"wbf"``, score 1).

    Each reader (``source``) is one WBF "model", as in the top VinBigData solutions: boxes of the
    same class that overlap by ``iou_thr`` or more become their coordinate average. Fused boxes are
    still ground truth, so their score is 1.
    """
    if not 0.0 < iou_thr <= 1.0:
        raise ValueError(f"iou_thr must be in (0, 1], got {iou_thr}")
    out = []
    for image_id, image_boxes in boxes.groupby("image_id", sort=True):
        readers = [g for _, g in image_boxes.groupby("source", sort=True)]
        fused, _, labels = weighted_boxes_fusion(
            [g[BOX_COLUMNS].to_numpy(np.float64) for g in readers], [np.ones(len(g)) for g in readers],
            [g["class_id"].to_numpy() for g in readers], iou_thr=iou_thr, skip_box_thr=0.0)
        frame = pd.DataFrame(fused, columns=BOX_COLUMNS)
        frame.insert(0, "class_id", labels.astype("int64"))
        frame.insert(0, "image_id", image_id)
        out.append(frame.assign(source=FUSED_SOURCE, score=1.0))
    if not out:
        return empty_boxes()
    return pd.concat(out, ignore_index=True)[BOX_TABLE_COLUMNS].astype(empty_boxes().dtypes.to_dict())


def _vinbig_class(row: dict) -> tuple[int | None, str | None]:
    """(class id, None) or (None, why the class is unknown) for one train.csv row."""
    text = row["class_id"]
    try:
        class_id = int(text)
    except ValueError:
        return None, f"unknown class: class_id {text!r} is not an integer"
    if not 0 <= class_id < len(VINBIG_CLASS_NAMES):
        return None, f"unknown class: class_id {class_id} (expected 0..{len(VINBIG_CLASS_NAMES) - 1})"
    name = row.get("class_name", "")
    if name and name != VINBIG_CLASS_NAMES[class_id]:
        return None, (f"unknown class: class_name {name!r} does not match class_id {class_id} "
                      f"({VINBIG_CLASS_NAMES[class_id]!r})")
    return class_id, None


def _vinbig_rows(b: _Builder, df: pd.DataFrame, csv_path: Path, folder: Path,
                 files: dict[str, Path]) -> tuple[dict, set]:
    """Rows grouped by image after the row-level checks; also the images that lost a row."""
    grouped: dict[str, list] = {}
    lost: set[str] = set()
    for row in df.to_dict("records"):
        image_id, line = row["image_id"], row["_row"]
        class_id, problem = _vinbig_class(row)
        if problem is None and not image_id:
            problem = "empty image_id"
        elif problem is None and b.seen(image_id):
            problem = f"duplicated image id (first seen in {b.seen(image_id)})"
        elif problem is None and image_id not in files:
            problem = f"labels for an absent image: no {image_id}{{{','.join(IMAGE_SUFFIXES)}}} in {folder}"
        if problem:
            b.q.reject(csv_path, line, image_id, problem)
            lost.add(image_id)
            continue
        cells = [row[c] for c in BOX_COLUMNS]
        grouped.setdefault(image_id, []).append((line, class_id, row.get("rad_id") or "gt", cells))
    return grouped, lost


def _add_vinbig_image(b: _Builder, csv_path: Path, image_id: str, rows: list, path: Path, probe, role: str,
                      complete: bool) -> None:
    """One image of train.csv: abnormal when any reader drew a box; each reader's boxes kept."""
    if isinstance(probe, str):
        for line, *_ in rows:
            b.q.reject(csv_path, line, image_id, probe)
        return
    width, height, patient = probe
    boxes, abnormal = [], False
    for line, class_id, reader, cells in rows:
        if class_id == VINBIG_NO_FINDING_ID:
            continue  # "No finding" rows carry no box (coordinates, if any, mean nothing)
        abnormal = True
        box, problem = _normalized_box(cells, width, height)
        if problem:
            b.q.reject(csv_path, line, image_id, problem)
            complete = False
        else:
            boxes.append((class_id, box, reader))
    label = [0.0, 1.0] if abnormal else [1.0, 0.0]
    if b.add_image(csv_path, rows[0][0], image_id=image_id, patient_id=patient or image_id, path=path,
                   role=role, size=(width, height), label=label, box_labeled=complete):
        for class_id, box, reader in boxes:
            b.add_box(image_id, class_id, box, reader)


def _add_vinbig_table(b: _Builder, root: Path, csv_path: Path, folder: Path, role: str) -> None:
    """All images of one VinBigData-format CSV (train.csv or a holdout) and its image folder."""
    df = read_csv_checked(csv_path, VINBIG_COLUMNS)
    files = _index_images(folder, root, b.q)
    grouped, lost = _vinbig_rows(b, df, csv_path, folder, files)
    probes = _probe_all([files[i] for i in grouped])
    for image_id, rows in grouped.items():
        _add_vinbig_image(b, csv_path, image_id, rows, files[image_id], probes[files[image_id]], role,
                          complete=image_id not in lost)
    _reject_unlisted(b, files, set(df["image_id"]), csv_path)


def load_vinbigdata(root: str | Path, train_csv: str = "train.csv", image_dir: str = "train",
                    unlabeled_dir: str | None = "test", holdout_csv: str | None = None,
                    holdout_dir: str | None = None, fuse: bool = True, iou_thr: float = 0.4,
                    quarantine: Quarantine | None = None) -> ItemTable:
    """Kaggle VinBigData layout: ``train.csv`` (one row per radiologist finding) + DICOM folders.

    train.csv columns: image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max, in pixels
    of the original DICOM (class_id 14 = "No finding", without a box); class_name and rad_id are
    optional, and class_name must agree with class_id when given. Images are
    ``<image_dir>/<image_id>.dicom`` (or .dcm / .png / .jpg); width, height and PatientID come from
    the header.

    Study label: "Abnormal" when ANY radiologist drew a box, else "No finding" -- the rule the top
    solutions' 2-class classifiers used (a finding seen by one reader of three is still worth
    looking at). Boxes: each radiologist's boxes with ``source`` = rad_id; with ``fuse`` also the
    WBF fusion across radiologists (``source`` = "wbf"); detectors train on
    :func:`training_boxes`. An image that lost a row to the quarantine is not box-labeled: its box
    ground truth would be incomplete.

    Args:
        root: data root; every image must resolve inside it.
        train_csv, image_dir: the labeled table and its images (role "labeled").
        unlabeled_dir: every image in it becomes role "unlabeled" (None or absent: none).
        holdout_csv, holdout_dir: an optional labeled hold-out in the same format (role "test").
        fuse, iou_thr: add WBF-fused radiologist boxes, clustering at this IoU.
        quarantine: where bad rows go; a fresh quarantine-mode one when None.
    """
    q = quarantine or Quarantine("quarantine")
    root = _resolved_root(root)
    b = _Builder(VINBIG_STUDY_CLASSES, VINBIG_BOX_CLASSES, q)
    _add_vinbig_table(b, root, root / train_csv, _folder(root, image_dir, required=True), "labeled")
    if holdout_csv:
        _add_vinbig_table(b, root, root / holdout_csv, _folder(root, holdout_dir or "holdout", required=True), "test")
    _add_unlabeled(b, root, _folder(root, unlabeled_dir, required=False))
    table = b.table("multiclass", VINBIG_NORMAL_CLASS)
    if fuse and len(table.boxes):
        table = table.replace(boxes=pd.concat([table.boxes, fuse_radiologist_boxes(table.boxes, iou_thr=iou_thr)],
                                              ignore_index=True))
    return table


# ---------------------------------------------------------------------------- SIIM-COVID19


def parse_siim_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """SIIM ``boxes`` cell -> pixel (x_min, y_min, x_max, y_max) boxes; '' / 'nan' -> none.

    Parsed with ``ast.literal_eval`` (never ``eval``: the cell is untrusted text).

    Raises:
        ValueError: the cell is not a list of {'x', 'y', 'width', 'height'} dicts of numbers.
    """
    if text.strip().lower() in ("", "nan", "[]"):
        return []
    try:
        value = ast.literal_eval(text)
        if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
            raise TypeError
        return [(float(d["x"]), float(d["y"]), float(d["x"]) + float(d["width"]), float(d["y"]) + float(d["height"]))
                for d in value]
    except (ValueError, TypeError, SyntaxError, KeyError, MemoryError, RecursionError):
        raise ValueError(f"cannot parse boxes {text[:80]!r}: expected [{{'x': .., 'y': .., 'width': .., "
                         f"'height': ..}}, ...]") from None


def _siim_label_count(text: str) -> int | None:
    """Number of 'opacity' entries in a SIIM ``label`` cell ('none 1 0 0 1 1' -> 0), None if malformed."""
    parts = text.split()
    if len(parts) % 6:
        return None
    names = parts[0::6]
    return None if set(names) - {"opacity", "none"} else names.count("opacity")


def _flag(text: str) -> float | None:
    """'0' / '1' (or '0.0' / '1.0') -> 0.0 / 1.0; anything else -> None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (0.0, 1.0) else None


def _siim_studies(path: Path, q: Quarantine) -> dict[str, tuple[int, list[float]]]:
    """Study uid -> (line, one-hot label) from the study-level CSV; bad rows quarantined."""
    df = read_csv_checked(path, ["id", *SIIM_STUDY_CLASSES])
    studies: dict[str, tuple[int, list[float]]] = {}
    for row in df.to_dict("records"):
        study, line = row["id"].removesuffix("_study"), row["_row"]
        cells = [row[c] for c in SIIM_STUDY_CLASSES]
        values = [_flag(c) for c in cells]
        if not row["id"].endswith("_study") or not study:
            q.reject(path, line, row["id"], "id must look like '<StudyInstanceUID>_study'")
        elif study in studies:
            q.reject(path, line, study, f"duplicated study id (first on row {studies[study][0]})")
        elif None in values or sum(values) != 1:
            q.reject(path, line, study, f"expected exactly one of {list(SIIM_STUDY_CLASSES)} to be 1, got {cells}")
        else:
            studies[study] = (line, values)
    return studies


def _siim_image_row(row: dict, studies: dict, files: dict, seen: dict) -> tuple[str, str, list | None]:
    """(image id, study, pixel boxes) or (image id, why the row is rejected, None)."""
    image_id, study = row["id"].removesuffix("_image"), row["StudyInstanceUID"]
    if not row["id"].endswith("_image") or not image_id:
        return row["id"], "id must look like '<image id>_image'", None
    if image_id in seen:
        return image_id, f"duplicated image id (first on row {seen[image_id]})", None
    if study not in studies:
        return image_id, f"image without labels: study {study!r} has no valid row in the study-level CSV", None
    if image_id not in files:
        return image_id, f"missing image file: no {image_id}.dcm under the image folder", None
    try:
        boxes = parse_siim_boxes(row["boxes"])
    except ValueError as exc:
        return image_id, str(exc), None
    count = _siim_label_count(row.get("label", "")) if row.get("label") else len(boxes)
    if count != len(boxes):
        return image_id, f"label {row['label'][:60]!r} does not match the {len(boxes)} boxes of the boxes column", None
    return image_id, study, boxes


def _add_siim_image(b: _Builder, path: Path, line: int, image_id: str, study: str, boxes: list,
                    label: list[float], file: Path, probe) -> None:
    if isinstance(probe, str):
        b.q.reject(path, line, image_id, probe)
        return
    width, height, patient = probe
    kept, complete = [], True
    for box_px in boxes:
        box, problem = _normalized_box([str(v) for v in box_px], width, height)
        if problem:
            b.q.reject(path, line, image_id, problem)
            complete = False
        else:
            kept.append(box)
    if b.add_image(path, line, image_id=image_id, patient_id=patient or study, path=file, role="labeled",
                   size=(width, height), label=label, box_labeled=complete):
        for box in kept:
            b.add_box(image_id, 0, box, "gt")


def load_siim(root: str | Path, study_csv: str = "train_study_level.csv", image_csv: str = "train_image_level.csv",
              image_dir: str = "train", unlabeled_dir: str | None = "test",
              quarantine: Quarantine | None = None) -> ItemTable:
    """Kaggle SIIM-FISABIO-RSNA COVID-19 layout: a study-level and an image-level CSV + DICOMs.

    Study CSV: ``id`` = "<study>_study" and the four one-hot study classes (exactly one must be 1).
    Image CSV: ``id`` = "<image>_image", ``boxes`` (a Python-literal list of x/y/width/height dicts
    in DICOM pixels), ``label`` (optional; "opacity 1 x1 y1 x2 y2 ..." or "none 1 0 0 1 1", checked
    against the boxes) and ``StudyInstanceUID``. Images are found anywhere under ``image_dir`` by
    file name (<study>/<series>/<image>.dcm in the Kaggle layout). One box class, "opacity"; the
    study label is copied to every image of the study; patient id = the DICOM PatientID
    (pseudonymized) or else the study id. Every train image was annotated for boxes, so images
    without an opacity are box-labeled with zero boxes.

    Args:
        root: data root; every image must resolve inside it.
        study_csv, image_csv, image_dir: the labeled tables and their images (role "labeled").
        unlabeled_dir: every DICOM under it becomes role "unlabeled" (None or absent: none).
        quarantine: where bad rows go; a fresh quarantine-mode one when None.
    """
    q = quarantine or Quarantine("quarantine")
    root = _resolved_root(root)
    b = _Builder(SIIM_STUDY_CLASSES, SIIM_BOX_CLASSES, q)
    studies = _siim_studies(root / study_csv, q)
    path = root / image_csv
    df = read_csv_checked(path, ["id", "boxes", "StudyInstanceUID"])
    files = _index_images(_folder(root, image_dir, required=True), root, q, recursive=True, suffixes=DICOM_SUFFIXES)
    accepted, seen = [], {}
    for row in df.to_dict("records"):
        image_id, study, boxes = _siim_image_row(row, studies, files, seen)
        if boxes is None:
            q.reject(path, row["_row"], image_id, study)
            continue
        seen[image_id] = row["_row"]
        accepted.append((row["_row"], image_id, study, boxes))
    probes = _probe_all([files[a[1]] for a in accepted])
    for line, image_id, study, boxes in accepted:
        _add_siim_image(b, path, line, image_id, study, boxes, studies[study][1], files[image_id],
                        probes[files[image_id]])
    for study in sorted(set(studies) - {a[2] for a in accepted}):
        q.reject(root / study_csv, studies[study][0], study,
                 f"labels for absent images: no accepted row of {image_csv} has StudyInstanceUID {study!r}")
    _reject_unlisted(b, files, set(seen), path)
    _add_unlabeled(b, root, _folder(root, unlabeled_dir, required=False), recursive=True, suffixes=DICOM_SUFFIXES)
    return b.table("multiclass", SIIM_STUDY_CLASSES[0])


# ---------------------------------------------------------------------------- generic images + CSV


@dataclass
class _Candidate:
    """One images.csv row that passed the row-level checks (its header is read next)."""

    line: int
    image_id: str
    path: Path
    patient_id: str
    role: str | None
    label: list[float] | None
    csv_size: tuple[str, str]


def _generic_row(row: dict, root: Path, images_csv: Path, classes: tuple, label_col: str,
                 seen: dict) -> _Candidate | str:
    """A candidate image, or why its images.csv row is rejected."""
    image_id = row["image_id"]
    if not image_id:
        return "empty image_id"
    if image_id in seen:
        return f"duplicated image id (first on row {seen[image_id]})"
    path = root / (row.get("path") or f"images/{image_id}.png")
    if not _inside(root, path):
        return f"image path {row.get('path')!r} escapes the data root {root}"
    if not path.is_file():
        return f"missing image file {path}"
    role = row.get("role") or None
    if role is not None and role not in ROLES:
        return f"unknown role {role!r} (expected one of {list(ROLES)})"
    name = row.get(label_col, "") if label_col else ""
    if name and name not in classes:
        return f"unknown class {name!r} in column {label_col!r} (study classes: {list(classes)})"
    label = [float(c == name) for c in classes] if name else None
    return _Candidate(row["_row"], image_id, path.resolve(), row.get("patient_id") or image_id, role, label,
                      (row.get("width", ""), row.get("height", "")))


def _size_problem(candidate: _Candidate, probe) -> str | None:
    """Why the image cannot be used: unreadable, or width/height in the CSV disagree with the file."""
    if isinstance(probe, str):
        return probe
    width, height = candidate.csv_size
    try:
        stated = (_number(width), _number(height))
    except ValueError:
        return f"width/height {candidate.csv_size} are not numbers"
    for name, value, actual in zip(("width", "height"), stated, probe[:2]):
        if not np.isnan(value) and value != actual:
            return f"{name} {value:g} in the CSV disagrees with the image file ({actual})"
    return None


def _generic_boxes(path: Path, sizes: dict[str, tuple[int, int]], listed: dict[str, int], box_classes: tuple,
                   q: Quarantine) -> tuple[dict[str, list], dict[str, bool]]:
    """Boxes per image and, per image, whether it was annotated for boxes at all.

    A row with an empty class and empty coordinates only says "this image was annotated" (with
    ``box_annotated`` = 0: "was not"). Without a box_annotated column, an image listed in the file
    counts as annotated. An image that lost a box row is not box-labeled (its truth is incomplete).
    """
    df = read_csv_checked(path, GENERIC_LABEL_COLUMNS)
    boxes: dict[str, list] = {}
    annotated: dict[str, bool] = {}
    for row in df.to_dict("records"):
        image_id, flag = row["image_id"], row.get("box_annotated", "")
        cells = [row[c] for c in BOX_COLUMNS]
        is_marker = not row["box_class"] and not any(cells)
        problem = _generic_box_problem(row, sizes, listed, box_classes, flag, is_marker)
        box = None
        if problem is None and not is_marker:
            box, problem = _normalized_box(cells, *sizes[image_id])
        if problem:
            q.reject(path, row["_row"], image_id, problem)
            annotated[image_id] = False
            continue
        annotated[image_id] = annotated.get(image_id, True) and flag != "0"
        if box is not None:
            boxes.setdefault(image_id, []).append((box_classes.index(row["box_class"]), box, row["_row"]))
    return boxes, annotated


def _generic_box_problem(row: dict, sizes: dict, listed: dict[str, int], box_classes: tuple, flag: str,
                         is_marker: bool) -> str | None:
    """Why one labels-CSV row cannot be used, or None."""
    image_id = row["image_id"]
    if image_id not in listed:
        return "labels for an absent image: the image id is not in the images table"
    if image_id not in sizes:
        return f"labels for an absent image: its images-table row {listed[image_id]} was rejected"
    if flag not in ("", "0", "1"):
        return f"box_annotated must be 0 or 1, got {flag!r}"
    if is_marker:
        return None
    if flag == "0":
        return "a box on an image marked box_annotated=0"
    if row["box_class"] not in box_classes:
        return f"unknown box class {row['box_class']!r} (box classes: {list(box_classes)})"
    return None


def _generic_classes(df: pd.DataFrame, column: str, given: Sequence[str]) -> tuple[str, ...]:
    if given or not column:
        return tuple(given)
    return tuple(sorted(set(df[column]) - {""}))


def load_generic(root: str | Path, images_csv: str, labels_csv: str | None = None, *, study_label_column: str,
                 study_classes: Sequence[str] = (), normal_class: str = "", box_classes: Sequence[str] = (),
                 quarantine: Quarantine | None = None) -> ItemTable:
    """A folder of images + a CSV of images (+ an optional CSV of boxes).

    images_csv: ``image_id``; ``path`` (relative to root; default ``images/<image_id>.png``);
    ``patient_id`` (default: the image id); the study label column (a class name; empty =
    unlabeled for classification); ``role`` (labeled | unlabeled | test; default: labeled when it
    has a label, else unlabeled); ``width``/``height`` (optional, checked against the file).
    labels_csv: one row per box -- ``image_id, box_class, x_min, y_min, x_max, y_max`` in pixels,
    optional ``box_annotated`` (0 = the image was not annotated for boxes, so it is not
    box-labeled; 1 with no box = annotated, no boxes). A row with an empty class and coordinates
    only records the annotation status. Images not in labels_csv are not box-labeled.

    Args:
        study_classes, box_classes: class names in id order; empty: the sorted names found.
        normal_class: the study class meaning "nothing abnormal" ('' for none).
        quarantine: where bad rows go; a fresh quarantine-mode one when None.
    """
    q = quarantine or Quarantine("quarantine")
    root = _resolved_root(root)
    images_path = root / images_csv
    df = read_csv_checked(images_path, ["image_id", *([study_label_column] if study_label_column else [])])
    classes = _generic_classes(df, study_label_column, study_classes)
    if normal_class and normal_class not in classes:
        raise DataError(f"{images_path}: normal class {normal_class!r} is not a study class {list(classes)}")
    candidates, seen = [], {}
    listed = {r["image_id"]: r["_row"] for r in df[["image_id", "_row"]].to_dict("records")[::-1]}
    for row in df.to_dict("records"):
        result = _generic_row(row, root, images_path, classes, study_label_column, seen)
        if isinstance(result, str):
            q.reject(images_path, row["_row"], row["image_id"], result)
            continue
        seen[result.image_id] = result.line
        candidates.append(result)
    probes = _probe_all([c.path for c in candidates])
    usable = []
    for c in candidates:
        problem = _size_problem(c, probes[c.path])
        if problem:
            q.reject(images_path, c.line, c.image_id, problem)
        else:
            usable.append(c)
    return _generic_table(root, labels_csv, usable, listed, probes, classes, normal_class, box_classes, q,
                          images_path)


def _generic_table(root: Path, labels_csv: str | None, usable: list[_Candidate], listed: dict[str, int],
                   probes: dict, classes: tuple, normal_class: str, box_classes: Sequence[str], q: Quarantine,
                   images_path: Path) -> ItemTable:
    """Attach boxes to the usable images, check labeled images have a label, build the table."""
    sizes = {c.image_id: probes[c.path][:2] for c in usable}
    boxes, annotated = {}, {}
    if labels_csv:
        labels_path = root / labels_csv
        if not box_classes:
            found = read_csv_checked(labels_path, GENERIC_LABEL_COLUMNS)["box_class"]
            box_classes = tuple(sorted(set(found) - {""}))
        boxes, annotated = _generic_boxes(labels_path, sizes, listed, tuple(box_classes), q)
    b = _Builder(tuple(classes), tuple(box_classes), q)
    for c in usable:
        box_labeled = annotated.get(c.image_id, False)
        role = c.role or ("labeled" if c.label is not None else "unlabeled")
        if role == "labeled" and c.label is None and not box_labeled:
            q.reject(images_path, c.line, c.image_id, "image without labels: role 'labeled' but no study label "
                     "and no complete box annotation")
            for _, _, line in boxes.get(c.image_id, []):
                q.reject(root / labels_csv, line, c.image_id,
                         f"box of an image rejected on row {c.line} of {images_path}")
            continue
        if b.add_image(images_path, c.line, image_id=c.image_id, patient_id=c.patient_id, path=c.path, role=role,
                       size=sizes[c.image_id], label=c.label, box_labeled=box_labeled):
            for class_id, box, _ in boxes.get(c.image_id, []):
                b.add_box(c.image_id, class_id, box, "gt")
    return b.table("multiclass", normal_class)


def load_cxr_covid(root: str | Path, quarantine: Quarantine | None = None) -> ItemTable:
    """The shared COVID-19 chest X-ray set (ieee8023) through :func:`load_generic` -- the documented example.

    Study label ``label_group`` (COVID-19 | Other pneumonia/abnormal | No Finding; normal class
    "No Finding"); lung boxes Right Lung / Left Lung; images with box_annotated = 0 are unlabeled
    for detection.
    """
    return load_generic(root, "images.csv", "labels.csv", study_label_column="label_group",
                        study_classes=CXR_COVID_STUDY_CLASSES, normal_class="No Finding",
                        box_classes=CXR_COVID_BOX_CLASSES, quarantine=quarantine)


# ---------------------------------------------------------------------------- dispatch


def load_dataset(cfg) -> ItemTable:
    """The item table for a :class:`teacher_student.config.DataConfig`, dispatching on ``cfg.format``.

    "demo" is the VinBigData layout written by :mod:`datasets.demo`: root/train.csv + train/,
    root/test/ (unlabeled), root/holdout.csv + holdout/ (role "test", when present). For "siim",
    ``labels_csv`` / ``images_csv`` name the study-level / image-level tables when not the Kaggle
    defaults. VinBigData, SIIM and the demo fix their classes; the class settings apply to "generic".
    """
    q = Quarantine(cfg.on_bad_input)
    root = _resolved_root(cfg.root)
    if cfg.format in ("demo", "vinbigdata"):
        holdout = "holdout.csv" if cfg.format == "demo" and (root / "holdout.csv").is_file() else None
        table = load_vinbigdata(root, train_csv=cfg.labels_csv or "train.csv", holdout_csv=holdout,
                                holdout_dir="holdout", fuse=cfg.fuse_radiologists, iou_thr=cfg.radiologist_iou_thr,
                                quarantine=q)
    elif cfg.format == "siim":
        table = load_siim(root, study_csv=cfg.labels_csv or "train_study_level.csv",
                          image_csv=cfg.images_csv or "train_image_level.csv", quarantine=q)
    elif cfg.format == "generic":
        if not cfg.images_csv:
            raise DataError("data.images_csv: the generic format needs an images CSV (image_id, path, ...)")
        return load_generic(root, cfg.images_csv, cfg.labels_csv or None, study_label_column=cfg.study_label_column,
                            study_classes=cfg.study_classes, normal_class=cfg.normal_class,
                            box_classes=cfg.box_classes, quarantine=q)
    else:
        raise DataError(f"data.format: unknown format {cfg.format!r}")
    _check_fixed_classes(cfg, table)
    return table


def _check_fixed_classes(cfg, table: ItemTable) -> None:
    """VinBigData and SIIM fix their classes: a config asking for others is a mistake, not a wish."""
    for key, wanted, actual in (("study_classes", tuple(cfg.study_classes), table.study_classes),
                                ("box_classes", tuple(cfg.box_classes), table.box_classes),
                                ("normal_class", cfg.normal_class, table.normal_class)):
        if wanted and wanted != actual:
            raise DataError(f"data.{key}: the {cfg.format} format fixes it to {actual!r}, config says {wanted!r}")


def load_hidden_truth(cfg) -> ItemTable | None:
    """True labels of the unlabeled pool (root/unlabeled_truth.csv, VinBigData format), or None.

    The demo writes them so a run can measure pseudo-label precision and train an oracle; they
    must never reach training. Images keep role "unlabeled".
    """
    root = _resolved_root(cfg.root)
    if cfg.format not in ("demo", "vinbigdata") or not (root / "unlabeled_truth.csv").is_file():
        return None
    table = load_vinbigdata(root, train_csv="unlabeled_truth.csv", image_dir="test", unlabeled_dir=None,
                            fuse=cfg.fuse_radiologists, iou_thr=cfg.radiologist_iou_thr,
                            quarantine=Quarantine(cfg.on_bad_input))
    return table.replace(items=table.items.assign(role="unlabeled"))
