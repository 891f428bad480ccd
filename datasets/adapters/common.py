"""What every format adapter shares: checked CSV reading, root confinement, image indexing and
header probing, and the builder that collects rows into one :class:`~datasets.table.ItemTable`.

Why one place: the checks that make a row quarantinable (bad numbers, boxes outside the image,
paths escaping the data root, non-radiograph DICOMs, duplicated ids) must read the same for every
format, so a person fixing a CSV sees one vocabulary whichever layout they use.
"""
from __future__ import annotations

import codecs
import csv
import difflib
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pydicom

from ..boxes import BOX_COLUMNS, box_problem, from_pixels
from ..errors import DataError
from ..files import link_target, walk_files
from ..readers import MIN_SIDE, RADIOGRAPH_MODALITIES, image_size, is_dicom, pseudonymize
from ..table import BOX_TABLE_COLUMNS, ItemTable, Quarantine, empty_boxes, label_column

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dicom", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""What a folder scan lists as images: every format ``readers.read_image`` decodes."""
DICOM_SUFFIXES = (".dicom", ".dcm")
ACCEPTED_MODALITIES = RADIOGRAPH_MODALITIES | {"", "OT", "SC"}
"""DICOM modalities every adapter accepts: projection radiographs (CR, DX, RG), and no modality, OT
(other) or SC (secondary capture), which digitised films and PNG-to-DICOM conversions carry. Any
other DICOM (CT, MR, NM, US, MG, PT...) is quarantined like any bad row: the reader can decode it,
but a cross-sectional slice or a nuclear-medicine frame in a chest-radiograph set is a mistake that
would teach the models the wrong kind of image. PNG/JPEG files carry no modality and are accepted."""


# ---------------------------------------------------------------------------- CSV + paths


def read_csv_checked(path: Path, required: Sequence[str], q: Quarantine | None = None) -> pd.DataFrame:
    """Read a CSV as stripped text cells ('' when empty) plus a ``_row`` column of line numbers.

    Why text, read with the ``csv`` module: numbers are parsed row by row, so one bad cell
    quarantines one row instead of failing the whole file or silently becoming NaN; and every row
    keeps the line it starts on (the header is line 1, as an editor shows it), also after a quoted
    cell that spans lines. Rules: UTF-8 (a byte-order mark is fine); comma-separated, or
    semicolon/tab-separated when the header only reads that way (spreadsheets in some locales save
    so); blank lines carry no data; trailing empty cells are ignored. A row with more or fewer
    cells than the header goes to ``q`` (without ``q``: one DataError line), since a missing cell
    would silently shift or blank a label.

    Raises:
        DataError: the file is missing, empty, not UTF-8, not CSV, has a column twice, or lacks a
            required column (with a "did you mean").
    """
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a CSV file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = _csv_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty (expected columns {list(required)})")
    records = _csv_records(path, text, _delimiter(path, text, required))
    header = [c.strip() for c in records[0][0]]
    while header and header[-1] == "":  # a spreadsheet's trailing separator: no column
        header.pop()
    check_columns(path, header, required)
    named = [i for i, c in enumerate(header) if c]
    rows, width = [], len(header)
    for cells, line in records[1:]:
        cells = [c.strip() for c in cells]
        while len(cells) > width and cells[-1] == "":
            cells.pop()
        if not any(cells):
            continue
        if len(cells) != width:
            problem = (f"row has {len(cells)} cells, the header has {width} (a missing, extra or unquoted comma?); "
                       "a short row would leave labels empty")
            (q or Quarantine("error")).reject(path, line, cells[0] or None, problem)
            continue
        if any(cells[i] for i in range(width) if not header[i]):
            (q or Quarantine("error")).reject(path, line, cells[0] or None, "a value under a column without a name")
            continue
        rows.append([cells[i] for i in named] + [line])
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    df = pd.DataFrame(rows, columns=[header[i] for i in named] + ["_row"])
    return df[["_row", *[header[i] for i in named]]]


def _csv_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 stops with the line it is on."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, row {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8 "
                        "(spreadsheets: 'CSV UTF-8')") from None


def _delimiter(path: Path, text: str, required: Sequence[str]) -> str:
    """',' unless only ';' or a tab makes the header hold the required columns (logged)."""
    first = text.splitlines()[0]
    found = {d: [c.strip() for c in next(csv.reader([first], delimiter=d))] for d in (",", ";", "\t")}
    if all(c in found[","] for c in required):
        return ","
    for delimiter in (";", "\t"):
        if len(found[delimiter]) > 1 and all(c in found[delimiter] for c in required):
            log.info("%s: read as %r-separated (its header has no commas between the columns)", path, delimiter)
            return delimiter
    return ","


def _csv_records(path: Path, text: str, delimiter: str) -> list[tuple[list[str], int]]:
    """(cells, first line) per record, the header first; malformed CSV stops with its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records, line = [], 1
    try:
        for cells in reader:
            records.append((cells, line))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}, row {line}: not readable CSV ({err})") from None
    seen = [c.strip() for c in records[0][0]]
    twice = sorted({c for c in seen if c and seen.count(c) > 1})
    if twice:
        raise DataError(f"{path}: column(s) {twice} appear twice in the header; rename or remove one "
                        f"(found columns {seen})")
    return records


def check_columns(path: Path, found: list[str], required: Sequence[str]) -> None:
    """Raise a one-line DataError naming the missing columns, a close match, and what was found."""
    missing = [c for c in required if c not in found]
    if not missing:
        return
    hints = [f"'{m[0]}' for '{c}'" for c in missing if (m := difflib.get_close_matches(c, found, n=1, cutoff=0.6))]
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise DataError(f"{path}: missing columns {missing}{hint}; found columns {found}")


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
"""A number as a person writes one in a CSV; Python's float() also takes '1_0' (10) and 'infinity'."""


def parse_number(text: str) -> float:
    """'' or 'nan' -> NaN, a plain decimal number -> float; ValueError for anything else."""
    if text == "" or text.lower() == "nan":
        return float("nan")
    if not NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} is not a number")
    return float(text)


def parse_int(text: str) -> int:
    """A whole number ('14', '14.0'); ValueError for anything else (also '1_4')."""
    value = parse_number(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


MAX_ID_BYTES = 200
"""Image ids become file names (``<id>.png`` in YOLO exports): at most this many UTF-8 bytes."""


def image_id_problem(image_id: str) -> str | None:
    """Why an image id cannot be used (it must work as a file name on every system), or None."""
    if not image_id:
        return "empty image_id"
    if image_id in (".", "..") or any(c in image_id for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in image_id):
        return f"image id {image_id[:60]!r} cannot be a file name (no '/', '\\', control characters, '.' or '..')"
    if len(image_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"image id is {len(image_id.encode('utf-8'))} bytes long; at most {MAX_ID_BYTES} (it becomes a file name)"
    return None


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
    """The data root as an absolute path, as the user named it (links in it are not resolved: image
    paths are confined to it lexically, see :func:`inside_root`)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    return root


def path_problem(root: Path, text: str) -> str | None:
    """Why a path from a CSV may not be used: it climbs with '..' or is absolute outside the root.

    Confinement is lexical: a link the user put inside the root may lead anywhere (how a read-only
    ``/kaggle/input`` is worked with), and is followed; a path in a CSV may not leave the root by
    itself. Checked before the file is touched.
    """
    path = Path(text)
    if ".." in path.parts:
        return f"image path {text!r} escapes the data root {root} ('..' is not allowed in paths)"
    if path.is_absolute() and not inside_root(root, path):
        return f"image path {text!r} escapes the data root {root}"
    return None


def inside_root(root: Path, path: Path) -> bool:
    """Whether ``path`` lies inside ``root`` by its name (``root`` as given or with its links resolved)."""
    path = Path(os.path.normpath(root / path))
    return path.is_relative_to(root) or path.is_relative_to(root.resolve())


def root_folder(root: Path, name: str | None, required: bool) -> Path | None:
    """A folder of the data root; None when optional and absent (logged, never silent)."""
    if name is None:
        return None
    problem = path_problem(root, name)
    if problem:
        raise DataError(f"{root / name}: folder {problem.removeprefix('image path ')}")
    folder = Path(os.path.normpath(root / name))
    if folder.is_dir():
        return folder
    if required:
        raise DataError(f"{folder}: image folder not found")
    log.warning("%s: no such folder, so no images from it", folder)
    return None


def file_problem(path: Path) -> str | None:
    """Why an image path listed or found cannot be an image file: absent, dangling link, a folder."""
    if path.is_symlink() and not path.exists():
        return f"dangling link: {path} -> {link_target(path)} leads to nothing"
    if path.is_dir():
        return f"{path} is a folder, not an image file"
    if not path.is_file():
        return f"missing image file {path}" if not path.exists() else f"{path} is not a regular file"
    return None


def index_images(folder: Path, root: Path, q: Quarantine, recursive: bool = False,
                  suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Image id (file stem) -> path for the image files of a folder (links followed).

    Rules: a file whose suffix is not an image suffix is not an image (hidden files are skipped
    quietly, others are counted in one log line per folder); a file with an image suffix that is
    a folder or a dangling link, a second file with the same stem (``x.dicom`` and ``x.png``) and
    a stem that cannot be an image id are quarantined, since each makes "which image is this?"
    ambiguous.
    """
    found: dict[str, Path] = {}
    entries = walk_files(folder) if recursive else ((p, None) for p in sorted(folder.iterdir()))
    skipped: list[str] = []
    for path, _ in entries:
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in suffixes:
            if not path.is_dir():
                skipped.append(path.name)
            continue
        problem = file_problem(path) or image_id_problem(path.stem)
        if problem:
            q.reject(path, None, path.stem, problem)
        elif path.stem in found:
            q.reject(path, None, path.stem, f"duplicated image id: {found[path.stem]} has the same id")
        else:
            found[path.stem] = path
    if skipped:
        log.warning("%s: %d files are not images by their suffix (images: %s) and are not read, e.g. %s", folder,
                    len(skipped), ", ".join(suffixes), ", ".join(skipped[:3]))
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
    root: Path | None = None
    """The data root, to say once when images are reached through links that lead outside it."""
    extra_columns: tuple[str, ...] = ()
    """Format-specific item columns (SIIM: ``study_id``), given to every ``add_image``."""
    items: dict[str, dict] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    boxes: list[dict] = field(default_factory=list)

    def seen(self, image_id: str) -> str | None:
        """Where an image id was first loaded ("file, row n"), or None."""
        return self.where.get(image_id)

    def add_image(self, file: Path, row: int | None, *, image_id: str, patient_id: str, path: Path,
                  role: str, size: tuple[int, int], label: Sequence[float] | None, box_labeled: bool,
                  extra: dict | None = None) -> bool:
        problem = image_id_problem(image_id)
        if problem:
            self.q.reject(file, row, image_id, problem)
            return False
        if image_id in self.items:
            self.q.reject(file, row, image_id, f"duplicated image id (first seen in {self.where[image_id]})")
            return False
        self.where[image_id] = f"{file}, row {row}" if row is not None else str(file)
        entry = {"image_id": image_id, "patient_id": patient_id, "path": str(path), "role": role,
                 "has_study_label": label is not None, "box_labeled": bool(box_labeled),
                 "width": int(size[0]), "height": int(size[1])}
        values = label if label is not None else [np.nan] * len(self.study_classes)
        entry.update({label_column(c): float(v) for c, v in zip(self.study_classes, values)})
        entry.update({c: str((extra or {})[c]) for c in self.extra_columns})
        self.items[image_id] = entry
        return True

    def add_box(self, image_id: str, class_id: int, box: np.ndarray, source: str) -> None:
        self.boxes.append({"image_id": image_id, "class_id": int(class_id), **dict(zip(BOX_COLUMNS, box)),
                           "source": str(source), "score": 1.0})

    def table(self, label_mode: str, normal_class: str | None) -> ItemTable:
        columns = ["image_id", "patient_id", "path", "role", "has_study_label", "box_labeled", "width", "height",
                   *(label_column(c) for c in self.study_classes), *self.extra_columns]
        self._note_outside_links()
        items = pd.DataFrame(list(self.items.values()), columns=columns)
        items = items.astype({"has_study_label": bool, "box_labeled": bool, "width": "int64", "height": "int64"})
        boxes = empty_boxes()
        if self.boxes:
            boxes = pd.DataFrame(self.boxes, columns=BOX_TABLE_COLUMNS).astype(empty_boxes().dtypes.to_dict())
        return ItemTable(items=items.reset_index(drop=True), boxes=boxes.reset_index(drop=True),
                         study_classes=tuple(self.study_classes), box_classes=tuple(self.box_classes),
                         label_mode=label_mode, normal_class=normal_class or None,
                         quarantine=self.q.frame()).validate()


    def _note_outside_links(self) -> None:
        """One log line when images are reached through links leading out of the data root: the
        user's choice (a read-only input linked in), followed, but worth knowing."""
        if self.root is None:
            return
        real_root = self.root.resolve()
        outside = [e["path"] for e in self.items.values() if not Path(e["path"]).resolve().is_relative_to(real_root)]
        if outside:
            log.info("%d of %d images are reached through links that lead outside the data root %s (e.g. %s -> %s); "
                     "followed: a link inside the root is the user's choice", len(outside), len(self.items), self.root,
                     outside[0], Path(outside[0]).resolve())


def add_unlabeled(b: TableBuilder, root: Path, folder: Path | None, role: str = "unlabeled",
                   recursive: bool = False, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                   extra_of: Callable[[Path], dict | str] | None = None) -> None:
    """Every image file of a folder, without labels (the pool the teachers pseudo-label).

    ``extra_of(path)``: the format's extra columns of one image, or why they cannot be known
    (quarantined).
    """
    if folder is None:
        return
    files = index_images(folder, root, b.q, recursive=recursive, suffixes=suffixes)
    for (image_id, path), probe in zip(files.items(), probe_all(list(files.values())).values()):
        extra = extra_of(path) if extra_of and not isinstance(probe, str) else None
        problem = probe if isinstance(probe, str) else extra if isinstance(extra, str) else None
        if problem:
            b.q.reject(path, None, image_id, problem)
            continue
        b.add_image(path, None, image_id=image_id, patient_id=probe[2] or image_id, path=path, role=role,
                    size=probe[:2], label=None, box_labeled=False, extra=extra)


def reject_unlisted(b: TableBuilder, files: dict[str, Path], listed: set[str], table: Path) -> None:
    """Image files that no row of ``table`` names: reported, since a labeled folder should be complete."""
    for image_id in sorted(set(files) - listed):
        b.q.reject(files[image_id], None, image_id, f"image file has no rows in {table}")

