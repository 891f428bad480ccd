"""What every format adapter shares: checked CSV reading, root confinement, image indexing and
header probing, and the builder that collects rows into one :class:`~datasets.table.ItemTable`.

Why one place: the checks that make a row quarantinable (bad numbers, boxes outside the image,
paths escaping the data root, non-radiograph DICOMs, duplicated ids) must read the same for every
format, so a person fixing a CSV sees one vocabulary whichever layout they use.
"""
from __future__ import annotations

import difflib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pydicom

from ..boxes import BOX_COLUMNS, box_problem, from_pixels
from ..errors import DataError
from ..readers import MIN_SIDE, RADIOGRAPH_MODALITIES, image_size, is_dicom, pseudonymize
from ..table import BOX_TABLE_COLUMNS, ItemTable, Quarantine, empty_boxes, label_column

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dicom", ".dcm")
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


def parse_number(text: str) -> float:
    """'' -> NaN, else float(text); ValueError for text that is not a number."""
    return float(text) if text != "" else float("nan")


def normalized_box(cells: Sequence[str], width: int, height: int) -> tuple[np.ndarray | None, str | None]:
    """Pixel x_min, y_min, x_max, y_max cells -> (normalized box, None) or (None, why it is bad)."""
    try:
        values = [parse_number(c) for c in cells]
    except ValueError:
        return None, f"box coordinates {list(cells)} are not all numbers"
    box = from_pixels(values, width, height)[0]
    problem = box_problem(*(float(v) for v in box))
    if problem:
        return None, f"{problem} (pixels {values}, image {width}x{height})"
    return box, None


def resolved_root(root: str | Path) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return root


def inside_root(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks and '..' resolved) lies inside the resolved ``root``."""
    return path.resolve().is_relative_to(root)


def root_folder(root: Path, name: str | None, required: bool) -> Path | None:
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


def index_images(folder: Path, root: Path, q: Quarantine, recursive: bool = False,
                  suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image id (file stem) -> resolved path for the image files of a folder.

    A second file with the same stem (``x.dicom`` and ``x.png``) and a link leading out of the
    data root are rejected, since either would make "which image is this?" ambiguous or unsafe.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if not inside_root(root, path):
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


def probe_all(paths: Sequence[Path]) -> dict[Path, tuple[int, int, str] | str]:
    """Headers of many files; threads because header reads wait on the disk, not the CPU."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return dict(zip(paths, pool.map(_probe, paths)))


# ---------------------------------------------------------------------------- building the table


@dataclass
class TableBuilder:
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


def add_unlabeled(b: TableBuilder, root: Path, folder: Path | None, role: str = "unlabeled",
                   recursive: bool = False, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> None:
    """Every image file of a folder, without labels (the pool the teachers pseudo-label)."""
    if folder is None:
        return
    files = index_images(folder, root, b.q, recursive=recursive, suffixes=suffixes)
    for (image_id, path), probe in zip(files.items(), probe_all(list(files.values())).values()):
        if isinstance(probe, str):
            b.q.reject(path, None, image_id, probe)
            continue
        b.add_image(path, None, image_id=image_id, patient_id=probe[2] or image_id, path=path, role=role,
                    size=probe[:2], label=None, box_labeled=False)


def reject_unlisted(b: TableBuilder, files: dict[str, Path], listed: set[str], table: Path) -> None:
    """Image files that no row of ``table`` names: reported, since a labeled folder should be complete."""
    for image_id in sorted(set(files) - listed):
        b.q.reject(files[image_id], None, image_id, f"image file has no rows in {table}")

