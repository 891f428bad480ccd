"""The Kaggle VinBigData layout (also the built-in demo's): train.csv, one row per radiologist finding,
plus DICOM folders; and the fusion of the radiologists' boxes the detectors train on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from ..boxes import BOX_COLUMNS
from ..table import BOX_TABLE_COLUMNS, ItemTable, Quarantine, empty_boxes
from .common import (
    IMAGE_SUFFIXES,
    TableBuilder,
    add_unlabeled,
    image_id_problem,
    index_images,
    normalized_box,
    parse_int,
    probe_all,
    read_csv_checked,
    reject_unlisted,
    resolved_root,
    root_folder,
)

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
FUSED_SOURCE = "wbf"
"""``source`` of the boxes fused across radiologists; raw boxes keep their radiologist id."""


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
        class_id = parse_int(text)
    except ValueError:
        return None, f"unknown class: class_id {text!r} is not an integer"
    if not 0 <= class_id < len(VINBIG_CLASS_NAMES):
        return None, f"unknown class: class_id {class_id} (expected 0..{len(VINBIG_CLASS_NAMES) - 1})"
    name = row.get("class_name", "")
    if name and name != VINBIG_CLASS_NAMES[class_id]:
        return None, (f"unknown class: class_name {name!r} does not match class_id {class_id} "
                      f"({VINBIG_CLASS_NAMES[class_id]!r})")
    return class_id, None


def _vinbig_rows(b: TableBuilder, df: pd.DataFrame, csv_path: Path, folder: Path,
                 files: dict[str, Path]) -> tuple[dict, set]:
    """Rows grouped by image after the row-level checks; also the images that lost a row."""
    grouped: dict[str, list] = {}
    lost: set[str] = set()
    first: dict[tuple, int] = {}
    for row in df.to_dict("records"):
        image_id, line = row["image_id"], row["_row"]
        class_id, problem = _vinbig_class(row)
        key = (image_id, class_id, row.get("rad_id", ""), *(row[c] for c in BOX_COLUMNS))
        if problem is None and image_id_problem(image_id):
            problem = image_id_problem(image_id)
        elif problem is None and key in first:
            problem = f"duplicated label row (identical to row {first[key]})"
        elif problem is None and b.seen(image_id):
            problem = f"duplicated image id (first seen in {b.seen(image_id)})"
        elif problem is None and image_id not in files:
            problem = f"labels for an absent image: no {image_id}{{{','.join(IMAGE_SUFFIXES)}}} in {folder}"
        if problem:
            b.q.reject(csv_path, line, image_id or None, problem)
            lost.add(image_id)
            continue
        first[key] = line
        cells = [row[c] for c in BOX_COLUMNS]
        grouped.setdefault(image_id, []).append((line, class_id, row.get("rad_id") or "gt", cells))
    return grouped, lost


def _add_vinbig_image(b: TableBuilder, csv_path: Path, image_id: str, rows: list, path: Path, probe, role: str,
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
        box, problem = normalized_box(cells, width, height)
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


def _add_vinbig_table(b: TableBuilder, root: Path, csv_path: Path, folder: Path, role: str) -> None:
    """All images of one VinBigData-format CSV (train.csv or a holdout) and its image folder."""
    df = read_csv_checked(csv_path, VINBIG_COLUMNS, b.q)
    files = index_images(folder, root, b.q)
    grouped, lost = _vinbig_rows(b, df, csv_path, folder, files)
    probes = probe_all([files[i] for i in grouped])
    for image_id, rows in grouped.items():
        _add_vinbig_image(b, csv_path, image_id, rows, files[image_id], probes[files[image_id]], role,
                          complete=image_id not in lost)
    reject_unlisted(b, files, set(df["image_id"]), csv_path)


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
    root = resolved_root(root)
    b = TableBuilder(VINBIG_STUDY_CLASSES, VINBIG_BOX_CLASSES, q, root=root)
    _add_vinbig_table(b, root, root / train_csv, root_folder(root, image_dir, required=True), "labeled")
    if holdout_csv:
        holdout_folder = root_folder(root, holdout_dir or "holdout", required=True)
        _add_vinbig_table(b, root, root / holdout_csv, holdout_folder, "test")
    add_unlabeled(b, root, root_folder(root, unlabeled_dir, required=False))
    table = b.table("multiclass", VINBIG_NORMAL_CLASS)
    if fuse and len(table.boxes):
        table = table.replace(boxes=pd.concat([table.boxes, fuse_radiologist_boxes(table.boxes, iou_thr=iou_thr)],
                                              ignore_index=True))
    return table
