"""A generic layout (a folder of images, a CSV of images, an optional CSV of boxes) and the shared
COVID-19 chest X-ray set (ieee8023), its documented example.
"""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..boxes import BOX_COLUMNS
from ..errors import DataError
from ..table import ROLES, ItemTable, Quarantine
from .common import (
    TableBuilder,
    file_problem,
    image_id_problem,
    normalized_box,
    parse_number,
    path_problem,
    probe_all,
    read_csv_checked,
    resolved_root,
)

log = logging.getLogger(__name__)

GENERIC_LABEL_COLUMNS = ("image_id", "box_class", *BOX_COLUMNS)
CXR_COVID_STUDY_CLASSES = ("COVID-19", "Other pneumonia/abnormal", "No Finding")
CXR_COVID_BOX_CLASSES = ("Right Lung", "Left Lung")


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


def _generic_row(row: dict, root: Path, classes: tuple, label_col: str, seen: dict) -> _Candidate | str:
    """A candidate image, or why its images.csv row is rejected."""
    image_id = row["image_id"]
    problem = image_id_problem(image_id)
    if problem:
        return problem
    if image_id in seen:
        return f"duplicated image id (first on row {seen[image_id]})"
    text = row.get("path") or f"images/{image_id}.png"
    problem = path_problem(root, text)
    if problem:
        return problem
    path = Path(os.path.normpath(root / text))
    problem = file_problem(path)
    if problem:
        return problem
    role = row.get("role") or None
    if role is not None and role not in ROLES:
        return f"unknown role {role!r} (expected one of {list(ROLES)})"
    name = row.get(label_col, "") if label_col else ""
    if name and name not in classes:
        return f"unknown class {name!r} in column {label_col!r} (study classes: {list(classes)}){class_hint(name, classes)}"
    label = [float(c == name) for c in classes] if name else None
    return _Candidate(row["_row"], image_id, path, row.get("patient_id") or image_id, role, label,
                      (row.get("width", ""), row.get("height", "")))


def class_hint(name: str, classes: Sequence[str]) -> str:
    """'; did you mean ...?' for a class name written in another case or close to a known one."""
    same = [c for c in classes if _folded(c) == _folded(name)]
    close = same or difflib.get_close_matches(name, list(classes), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


def _folded(name: str) -> str:
    return " ".join(name.casefold().split())


def found_classes(df: pd.DataFrame, column: str, path: Path, what: str) -> tuple[str, ...]:
    """The sorted class names a column holds; two spellings of one name (case, spaces) stop the load,
    since reading them as two classes would split one class silently."""
    names = sorted(set(df[column]) - {""})
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(_folded(name), []).append(name)
    clash = next((group for group in by_folded.values() if len(group) > 1), None)
    if clash:
        rows = [int(df.loc[df[column] == n, "_row"].iloc[0]) for n in clash]
        shown = " and ".join(f"{n!r} (row {r})" for n, r in zip(clash, rows))
        raise DataError(f"{path}: {what} {shown} differ only in case or spacing: write one spelling, or list the "
                        f"classes in the config")
    return tuple(names)


def _size_problem(candidate: _Candidate, probe) -> str | None:
    """Why the image cannot be used: unreadable, or width/height in the CSV disagree with the file."""
    if isinstance(probe, str):
        return probe
    width, height = candidate.csv_size
    try:
        stated = (parse_number(width), parse_number(height))
    except ValueError:
        return f"width/height {candidate.csv_size} are not numbers"
    for name, value, actual in zip(("width", "height"), stated, probe[:2]):
        if not np.isnan(value) and value != actual:
            return f"{name} {value:g} in the CSV disagrees with the image file ({actual})"
    return None


def _generic_boxes(path: Path, df: pd.DataFrame, images: dict[str, "_Candidate"], sizes: dict[str, tuple[int, int]],
                   listed: dict[str, int], box_classes: tuple, q: Quarantine) -> tuple[dict[str, list], dict[str, bool]]:
    """Boxes per image and, per image, whether it was annotated for boxes at all.

    A row with an empty class and empty coordinates only says "this image was annotated" (with
    ``box_annotated`` = 0: "was not"). Without a box_annotated column, an image listed in the file
    counts as annotated. An image that lost a box row is not box-labeled (its truth is incomplete).
    A row identical to an earlier one is quarantined (the box would count twice), and so is a box
    on an image of role "unlabeled" (nothing would ever read it).
    """
    boxes: dict[str, list] = {}
    annotated: dict[str, bool] = {}
    first: dict[tuple, int] = {}
    for row in df.to_dict("records"):
        image_id, flag = row["image_id"], row.get("box_annotated", "")
        cells = [row[c] for c in BOX_COLUMNS]
        is_marker = not row["box_class"] and not any(cells)
        problem = _generic_box_problem(row, images, sizes, listed, box_classes, flag, is_marker)
        box = None
        if problem is None and not is_marker:
            box, problem = normalized_box(cells, *sizes[image_id])
        key = (image_id, row["box_class"], *(() if box is None else np.round(box, 6).tolist()), flag)
        if problem is None and key in first:
            problem = f"duplicated label row (identical to row {first[key]})"
        if problem:
            q.reject(path, row["_row"], image_id, problem)
            annotated[image_id] = False
            continue
        first[key] = row["_row"]
        annotated[image_id] = annotated.get(image_id, True) and flag != "0"
        if box is not None:
            boxes.setdefault(image_id, []).append((box_classes.index(row["box_class"]), box, row["_row"]))
    return boxes, annotated


def _generic_box_problem(row: dict, images: dict, sizes: dict, listed: dict[str, int], box_classes: tuple, flag: str,
                         is_marker: bool) -> str | None:
    """Why one labels-CSV row cannot be used, or None."""
    image_id = row["image_id"]
    if image_id not in listed:
        return "labels for an absent image: the image id is not in the images table"
    if image_id not in sizes:
        return f"labels for an absent image: its images-table row {listed[image_id]} was rejected"
    if flag not in ("", "0", "1"):
        return f"box_annotated must be 0 or 1, got {flag!r}"
    if images[image_id].role == "unlabeled" and flag != "0":
        return ("a box label for an image of role 'unlabeled', which nothing would read: give the image role "
                "'labeled' (or 'test') in the images table")
    if is_marker:
        return None
    if flag == "0":
        return "a box on an image marked box_annotated=0"
    if row["box_class"] not in box_classes:
        return (f"unknown box class {row['box_class']!r} (box classes: {list(box_classes)})"
                f"{class_hint(row['box_class'], box_classes)}")
    return None


def load_generic(root: str | Path, images_csv: str, labels_csv: str | None = None, *, study_label_column: str,
                 study_classes: Sequence[str] = (), normal_class: str = "", box_classes: Sequence[str] = (),
                 quarantine: Quarantine | None = None) -> ItemTable:
    """A folder of images + a CSV of images (+ an optional CSV of boxes).

    images_csv: ``image_id``; ``path`` (relative to root, no '..'; default ``images/<image_id>.png``);
    ``patient_id`` (default: the image id, i.e. its own patient); the study label column (a class
    name; empty = unlabeled for classification); ``role`` (labeled | unlabeled | test; default:
    labeled when it has a study label or box labels, else unlabeled; the labels of an image of role
    unlabeled are not used: a study label is dropped with a log line, a box row is quarantined);
    ``width``/``height`` (optional, checked against the file).
    labels_csv: one row per box -- ``image_id, box_class, x_min, y_min, x_max, y_max`` in pixels,
    optional ``box_annotated`` (0 = the image was not annotated for boxes, so it is not
    box-labeled; 1 with no box = annotated, no boxes). A row with an empty class and coordinates
    only records the annotation status. Images not in labels_csv are not box-labeled.

    Args:
        study_classes, box_classes: class names in id order; empty: the sorted names found (two
            spellings of one name, e.g. 'Lesion' and 'lesion', stop the load).
        normal_class: the study class meaning "nothing abnormal" ('' for none).
        quarantine: where bad rows go; a fresh quarantine-mode one when None.
    """
    q = quarantine or Quarantine("quarantine")
    root = resolved_root(root)
    images_path = root / images_csv
    df = read_csv_checked(images_path, ["image_id", *([study_label_column] if study_label_column else [])], q)
    classes = tuple(study_classes) or (found_classes(df, study_label_column, images_path, "study classes")
                                       if study_label_column else ())
    if normal_class and normal_class not in classes:
        raise DataError(f"{images_path}: normal class {normal_class!r} is not a study class {list(classes)}")
    labels_path = root / labels_csv if labels_csv else None
    labels = read_csv_checked(labels_path, GENERIC_LABEL_COLUMNS, q) if labels_path else None
    candidates, seen = [], {}
    listed = {r["image_id"]: r["_row"] for r in df[["image_id", "_row"]].to_dict("records")[::-1]}
    for row in df.to_dict("records"):
        result = _generic_row(row, root, classes, study_label_column, seen)
        if isinstance(result, str):
            q.reject(images_path, row["_row"], row["image_id"] or None, result)
            continue
        seen[result.image_id] = result.line
        candidates.append(result)
    probes = probe_all([c.path for c in candidates])
    usable = []
    for c in candidates:
        problem = _size_problem(c, probes[c.path])
        if problem:
            q.reject(images_path, c.line, c.image_id, problem)
        else:
            usable.append(c)
    _default_roles(usable, labels, images_path)
    if labels is not None and not box_classes:
        box_classes = found_classes(labels, "box_class", labels_path, "box classes")
    return _generic_table(root, labels_path, labels, usable, listed, probes, classes, normal_class, tuple(box_classes),
                          q, images_path)


def _default_roles(usable: list[_Candidate], labels: pd.DataFrame | None, images_path: Path) -> None:
    """Role of each image without one: labeled when it has any label (study or boxes), else
    unlabeled. A study label on an image of role unlabeled is dropped, with one log line."""
    annotated = set()
    if labels is not None:
        flags = labels["box_annotated"] if "box_annotated" in labels else pd.Series("", index=labels.index)
        annotated = set(labels.loc[flags != "0", "image_id"])
    ignored = []
    for c in usable:
        if c.role is None:
            c.role = "labeled" if c.label is not None or c.image_id in annotated else "unlabeled"
        elif c.role == "unlabeled" and c.label is not None:
            ignored.append(c.line)
            c.label = None
    if ignored:
        log.warning("%s: %d images of role 'unlabeled' carry a study label, which is not used (rows %s...): give "
                    "them role 'labeled' to train on it", images_path, len(ignored), ", ".join(map(str, ignored[:5])))


def _generic_table(root: Path, labels_path: Path | None, labels: pd.DataFrame | None, usable: list[_Candidate],
                   listed: dict[str, int], probes: dict, classes: tuple, normal_class: str, box_classes: tuple,
                   q: Quarantine, images_path: Path) -> ItemTable:
    """Attach boxes to the usable images, check labeled images have a label, build the table."""
    sizes = {c.image_id: probes[c.path][:2] for c in usable}
    boxes, annotated = {}, {}
    if labels is not None:
        boxes, annotated = _generic_boxes(labels_path, labels, {c.image_id: c for c in usable}, sizes, listed,
                                          box_classes, q)
    b = TableBuilder(tuple(classes), box_classes, q, root=root)
    for c in usable:
        box_labeled = annotated.get(c.image_id, False)
        if c.role == "labeled" and c.label is None and not box_labeled:
            q.reject(images_path, c.line, c.image_id, "image without labels: role 'labeled' but no study label "
                     "and no complete box annotation")
            for _, _, line in boxes.get(c.image_id, []):
                q.reject(labels_path, line, c.image_id, f"box of an image rejected on row {c.line} of {images_path}")
            continue
        if b.add_image(images_path, c.line, image_id=c.image_id, patient_id=c.patient_id, path=c.path, role=c.role,
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
