"""The Kaggle SIIM-FISABIO-RSNA COVID-19 layout: a study-level and an image-level CSV plus DICOMs."""
from __future__ import annotations

import ast
from pathlib import Path

import pydicom

from ..table import ItemTable, Quarantine
from .common import (
    DICOM_SUFFIXES,
    TableBuilder,
    add_unlabeled,
    index_images,
    normalized_box,
    parse_number,
    probe_all,
    read_csv_checked,
    reject_unlisted,
    resolved_root,
    root_folder,
)

SIIM_STUDY_CLASSES = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
SIIM_BOX_CLASSES = ("opacity",)


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
        numbers = [[_number(d[k]) for k in ("x", "y", "width", "height")] for d in value]
        return [(x, y, x + w, y + h) for x, y, w, h in numbers]
    except (ValueError, TypeError, SyntaxError, KeyError, MemoryError, RecursionError):
        raise ValueError(f"cannot parse boxes {text[:80]!r}: expected [{{'x': .., 'y': .., 'width': .., "
                         f"'height': ..}}, ...]") from None


def _number(value) -> float:
    """A coordinate of a boxes cell: a real number (a quoted string or True is not one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return float(value)


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
        value = parse_number(text)
    except ValueError:
        return None
    return value if value in (0.0, 1.0) else None


def _siim_studies(path: Path, q: Quarantine) -> dict[str, tuple[int, list[float]]]:
    """Study uid -> (line, one-hot label) from the study-level CSV; bad rows quarantined."""
    df = read_csv_checked(path, ["id", *SIIM_STUDY_CLASSES], q)
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


def _add_siim_image(b: TableBuilder, path: Path, line: int, image_id: str, study: str, boxes: list,
                    label: list[float], file: Path, probe, role: str) -> None:
    if isinstance(probe, str):
        b.q.reject(path, line, image_id, probe)
        return
    width, height, patient = probe
    kept, complete = [], True
    for box_px in boxes:
        box, problem = normalized_box([str(v) for v in box_px], width, height)
        if problem:
            b.q.reject(path, line, image_id, problem)
            complete = False
        else:
            kept.append(box)
    if b.add_image(path, line, image_id=image_id, patient_id=patient or study, path=file, role=role,
                   size=(width, height), label=label, box_labeled=complete, extra={"study_id": study}):
        for box in kept:
            b.add_box(image_id, 0, box, "gt")


def load_siim(root: str | Path, study_csv: str = "train_study_level.csv", image_csv: str = "train_image_level.csv",
              image_dir: str = "train", unlabeled_dir: str | None = "test",
              holdout: tuple[str, str, str] | None = None, quarantine: Quarantine | None = None) -> ItemTable:
    """Kaggle SIIM-FISABIO-RSNA COVID-19 layout: a study-level and an image-level CSV + DICOMs.

    Study CSV: ``id`` = "<study>_study" and the four one-hot study classes (exactly one must be 1).
    Image CSV: ``id`` = "<image>_image", ``boxes`` (a Python-literal list of x/y/width/height dicts
    in DICOM pixels), ``label`` (optional; "opacity 1 x1 y1 x2 y2 ..." or "none 1 0 0 1 1", checked
    against the boxes) and ``StudyInstanceUID``. Images are found anywhere under ``image_dir`` by
    file name (<study>/<series>/<image>.dcm in the Kaggle layout). One box class, "opacity"; the
    study label is copied to every image of the study; patient id = the DICOM PatientID
    (pseudonymized) or else the study id. Every train image was annotated for boxes, so images
    without an opacity are box-labeled with zero boxes. Every image gets its ``study_id`` (the
    submission has one row per study): from the CSV for labeled images, for unlabeled ones from
    the folder tree (<study>/<series>/<image>.dcm) or else the DICOM StudyInstanceUID.

    Args:
        root: data root; every image must resolve inside it.
        study_csv, image_csv, image_dir: the labeled tables and their images (role "labeled").
        unlabeled_dir: every DICOM under it becomes role "unlabeled" (None or absent: none).
        holdout: (study CSV, image CSV, image folder) of a labeled hold-out in the same format
            (role "test"), or None.
        quarantine: where bad rows go; a fresh quarantine-mode one when None.
    """
    q = quarantine or Quarantine("quarantine")
    root = resolved_root(root)
    b = TableBuilder(SIIM_STUDY_CLASSES, SIIM_BOX_CLASSES, q, root=root, extra_columns=("study_id",))
    _add_siim_tables(b, root, study_csv, image_csv, image_dir, "labeled")
    if holdout:
        _add_siim_tables(b, root, *holdout, "test")
    folder = root_folder(root, unlabeled_dir, required=False)
    add_unlabeled(b, root, folder, recursive=True, suffixes=DICOM_SUFFIXES,
                  extra_of=lambda path: _unlabeled_study(folder, path))
    return b.table("multiclass", SIIM_STUDY_CLASSES[0])


def _add_siim_tables(b: TableBuilder, root: Path, study_csv: str, image_csv: str, image_dir: str, role: str) -> None:
    """One pair of SIIM tables and its image tree: every image row checked, then its header probed."""
    q = b.q
    studies = _siim_studies(root / study_csv, q)
    path = root / image_csv
    df = read_csv_checked(path, ["id", "boxes", "StudyInstanceUID"], q)
    files = index_images(root_folder(root, image_dir, required=True), root, q, recursive=True, suffixes=DICOM_SUFFIXES)
    accepted, seen = [], {}
    for row in df.to_dict("records"):
        image_id, study, boxes = _siim_image_row(row, studies, files, seen)
        if boxes is None:
            q.reject(path, row["_row"], image_id or None, study)
            continue
        seen[image_id] = row["_row"]
        accepted.append((row["_row"], image_id, study, boxes))
    probes = probe_all([files[a[1]] for a in accepted])
    for line, image_id, study, boxes in accepted:
        _add_siim_image(b, path, line, image_id, study, boxes, studies[study][1], files[image_id],
                        probes[files[image_id]], role)
    for study in sorted(set(studies) - {a[2] for a in accepted}):
        q.reject(root / study_csv, studies[study][0], study,
                 f"labels for absent images: no accepted row of {image_csv} has StudyInstanceUID {study!r}")
    reject_unlisted(b, files, set(seen), path)


def _unlabeled_study(folder: Path, path: Path) -> dict | str:
    """The study of an unlabeled image: <study>/<series>/<image>.dcm, else its StudyInstanceUID tag."""
    parts = path.relative_to(folder).parts
    if len(parts) == 3:
        return {"study_id": parts[0]}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"], force=True)
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception as exc:  # any header error: one quarantine line
        return f"cannot read the DICOM header for its StudyInstanceUID ({type(exc).__name__})"
    if not study:
        return ("cannot tell the study of this image: it is not at <study>/<series>/<image>.dcm under the folder and "
                "has no StudyInstanceUID tag")
    return {"study_id": study}
