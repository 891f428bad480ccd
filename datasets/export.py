"""YOLO and COCO exports of an item table's boxes, and readers back for round trips.

Why exports: ultralytics trains only from a YOLO dataset folder, and COCO JSON is what other
detection tools (pycocotools, detectron2, mmdetection, CVAT) read. Both are edges of the engine's
one box convention (normalized xyxy, 0-based class ids), so the conversions go through
``datasets.boxes`` and every export has a reader back that the tests use as a round trip.

Both writers are atomic: a YOLO folder is built under a temporary name and swapped in whole, a COCO
file is written to a temporary name and renamed, so a reader never sees half an export.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from .boxes import BOX_COLUMNS, box_problem, from_coco, from_yolo, to_coco, to_yolo
from .table import BOX_TABLE_COLUMNS, empty_boxes
from .errors import DataError
from .atomic import atomic_dir, write_json

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
"""Files ultralytics reads as they are (linked, not re-encoded)."""

SplitOf = Callable[[str], str] | pd.Series | Mapping | None
ImageSource = Callable[[str], "Path | str | np.ndarray"]


# ----------------------------------------------------------------------------- checks shared by both


def _image_ids(items: pd.DataFrame, where: str) -> list[str]:
    """The items' image ids as safe, unique file stems (they become file names in both formats)."""
    if "image_id" not in items.columns:
        raise DataError(f"{where}: the items table has no image_id column")
    ids = [str(i) for i in items["image_id"]]
    for row, image_id in enumerate(ids):
        if not image_id or image_id in (".", "..") or any(c in image_id for c in "/\\\0"):
            raise DataError(f"{where}, row {row} (image {image_id!r}): image id cannot be used as a file name")
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise DataError(f"{where}: image id {dup.iloc[0]!r} appears twice in the items table")
    return ids


def _checked_boxes(boxes: pd.DataFrame, ids: list[str], n_classes: int, where: str) -> pd.DataFrame:
    """Boxes of these images (others are simply not part of this export), validated row by row."""
    missing = [c for c in ("image_id", "class_id", *BOX_COLUMNS) if c not in boxes.columns]
    if missing:
        raise DataError(f"{where}: the box table lacks columns {missing}")
    keep = boxes[boxes["image_id"].astype(str).isin(set(ids))]
    for row, box in zip(keep.index, keep.itertuples(index=False)):
        problem = box_problem(box.x_min, box.y_min, box.x_max, box.y_max) or _class_problem(box.class_id, n_classes)
        if problem:
            raise DataError(f"{where}, box row {row} (image {box.image_id}): {problem}")
    return keep


def _class_problem(class_id, n_classes: int) -> str | None:
    try:
        ok = float(class_id).is_integer() and 0 <= int(class_id) < n_classes
    except (TypeError, ValueError, OverflowError):
        ok = False
    return None if ok else f"class id {class_id!r} is not an integer in 0..{n_classes - 1}"


# ----------------------------------------------------------------------------- YOLO


def _splits(ids: list[str], split_of: SplitOf) -> dict[str, str]:
    """Split name of every image: all "train" by default; a Series/Mapping or a function otherwise."""
    if split_of is None:
        return dict.fromkeys(ids, "train")
    lookup = split_of.get if isinstance(split_of, (pd.Series, Mapping)) else split_of
    out = {}
    for image_id in ids:
        split = lookup(image_id)
        if split not in SPLITS:
            what = "has no split" if split is None else f"split {split!r} is not one of {list(SPLITS)}"
            raise DataError(f"YOLO export (image {image_id}): {what}")
        out[image_id] = split
    if "train" not in out.values():
        raise DataError("YOLO export: no image is in the train split; ultralytics needs at least one")
    return out


def _place_image(source, target_stem: Path, image_id: str) -> None:
    """Link (or copy) an image file ultralytics can read; write a PNG for arrays and .npy files."""
    if isinstance(source, np.ndarray) or str(source).endswith(".npy"):
        array = source if isinstance(source, np.ndarray) else np.load(source)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise DataError(f"YOLO export (image {image_id}): expected a uint8 HxW or HxWx3 array, "
                            f"got {array.dtype} {array.shape}")
        Image.fromarray(array).save(target_stem.with_name(target_stem.name + ".png"))  # ids may contain dots
        return
    path = Path(source)
    if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        raise DataError(f"{path} (image {image_id}): not an existing image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    target = target_stem.with_name(target_stem.name + path.suffix.lower())
    try:
        os.symlink(path.resolve(), target)
    except OSError:  # file systems without symlinks
        shutil.copyfile(path, target)


def _label_lines(image_boxes: pd.DataFrame) -> str:
    """'cls cx cy w h' lines, 6 decimals; an image without boxes gets an empty file (a negative)."""
    if image_boxes.empty:
        return ""
    yolo = to_yolo(image_boxes[BOX_COLUMNS].to_numpy(dtype=np.float64))
    classes = image_boxes["class_id"].to_numpy(dtype=np.int64)
    return "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, (x, y, w, h) in zip(classes, yolo))


def _data_yaml(out_dir: Path, box_classes, used: set[str]) -> str:
    """ultralytics' data.yaml: absolute root, train/val(/test) folders, names as {id: name}, nc."""
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val" if "val" in used else "images/train"}
    if "test" in used:
        data["test"] = "images/test"
    data.update(names={i: str(n) for i, n in enumerate(box_classes)}, nc=len(box_classes))
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def export_yolo(items: pd.DataFrame, boxes: pd.DataFrame, box_classes, image_path_of: ImageSource,
                out_dir: str | Path, split_of: SplitOf = None) -> Path:
    """Write a YOLO dataset folder for ultralytics and return its data.yaml.

    Layout: ``images/<split>/<image_id>.png`` (a link to the file ``image_path_of`` gives, or a PNG
    written from the uint8 array it returns), ``labels/<split>/<image_id>.txt`` (an EMPTY file for an
    image without boxes: for YOLO that is a negative, not a missing label) and ``data.yaml``. When no
    image is in "val", val points at the train images, since ultralytics insists on a val set.

    Args:
        items: one row per image to export (column image_id; other columns are ignored).
        boxes: box table (image_id, class_id, x_min..y_max normalized); boxes of other images are skipped.
        box_classes: class names, index = class id.
        image_path_of: image id -> image file path (PNG/JPG/.npy) or uint8 array.
        out_dir: the folder to create (replaced whole if it exists).
        split_of: image id -> "train" | "val" | "test", as a function, Series or mapping; None: all train.
    """
    out_dir = Path(out_dir).resolve()
    ids = _image_ids(items, "YOLO export")
    splits = _splits(ids, split_of)
    keep = _checked_boxes(boxes, ids, len(box_classes), "YOLO export")
    groups = {str(k): g for k, g in keep.groupby(keep["image_id"].astype(str), sort=False)}
    with atomic_dir(out_dir) as tmp:
        for split in set(splits.values()):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        for image_id in ids:
            split = splits[image_id]
            _place_image(image_path_of(image_id), tmp / "images" / split / image_id, image_id)
            text = _label_lines(groups.get(image_id, keep.iloc[:0]))
            (tmp / "labels" / split / f"{image_id}.txt").write_text(text)
        (tmp / "data.yaml").write_text(_data_yaml(out_dir, box_classes, set(splits.values())))
    return out_dir / "data.yaml"


def _parse_label_file(path: Path) -> list[dict]:
    """Rows of one YOLO label file: 'cls cx cy w h' plus an optional confidence (ultralytics save_conf)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (5, 6) or not values[0].is_integer():
            raise DataError(f"{path}, row {number}: expected 'class cx cy w h [conf]', got {line.strip()!r}")
        rows.append({"class_id": int(values[0]), "yolo": values[1:5], "score": values[5] if len(values) == 6 else 1.0})
    return rows


def read_yolo_labels(out_dir: str | Path) -> pd.DataFrame:
    """The box table (normalized xyxy, source "yolo") of every labels/<split>/*.txt of a YOLO folder."""
    frames = []
    for path in sorted(Path(out_dir).glob("labels/*/*.txt")):
        rows = _parse_label_file(path)
        if not rows:
            continue
        xyxy = from_yolo([r["yolo"] for r in rows])
        frame = pd.DataFrame(xyxy, columns=BOX_COLUMNS).astype("float32")
        frame.insert(0, "class_id", [r["class_id"] for r in rows])
        frame.insert(0, "image_id", path.stem)
        frame["source"], frame["score"] = "yolo", np.array([r["score"] for r in rows], dtype=np.float32)
        frames.append(frame)
    if not frames:
        return empty_boxes()
    return pd.concat(frames, ignore_index=True)[BOX_TABLE_COLUMNS]


# ----------------------------------------------------------------------------- COCO


def _sizes(items: pd.DataFrame, ids: list[str], sizes: Mapping | None) -> dict[str, tuple[int, int]]:
    """(width, height) in pixels of every image, from the mapping or the items' width/height columns."""
    if sizes is None:
        if not {"width", "height"} <= set(items.columns):
            raise DataError("COCO export: give sizes= or width/height columns in the items table")
        sizes = dict(zip(ids, zip(items["width"], items["height"])))
    out = {}
    for image_id in ids:
        size = sizes.get(image_id)
        try:
            width, height = (int(v) for v in size)
        except (TypeError, ValueError):
            width = height = 0
        if width <= 0 or height <= 0:
            raise DataError(f"COCO export (image {image_id}): no valid (width, height) size, got {size!r}")
        out[image_id] = (width, height)
    return out


def _file_names(items: pd.DataFrame, ids: list[str]) -> list[str]:
    if "file_name" in items.columns:
        return [str(f) for f in items["file_name"]]
    if "path" in items.columns:
        return [Path(str(p)).name for p in items["path"]]
    return [f"{i}.png" for i in ids]


def _annotations(keep: pd.DataFrame, index_of: dict[str, int], sizes: dict, score_column: str | None) -> list[dict]:
    """COCO annotations: pixel bbox via datasets.boxes.to_coco, 1-based category, score/source extras."""
    annotations = []
    for number, row in enumerate(keep.itertuples(index=False), start=1):
        image_id = str(row.image_id)
        pixel = to_coco([[row.x_min, row.y_min, row.x_max, row.y_max]], *sizes[image_id])[0]
        x, y, w, h = (round(float(v), 4) for v in pixel)
        ann = {"id": number, "image_id": index_of[image_id], "category_id": int(row.class_id) + 1,
               "bbox": [x, y, w, h], "area": round(w * h, 4), "iscrowd": 0}
        if score_column:
            ann["score"] = float(getattr(row, score_column))
        if "source" in keep.columns and pd.notna(row.source):
            ann["source"] = str(row.source)
        annotations.append(ann)
    return annotations


def export_coco(items: pd.DataFrame, boxes: pd.DataFrame, box_classes, out_path: str | Path,
                sizes: Mapping[str, tuple[int, int]] | None = None, score_column: str | None = None) -> Path:
    """Write a COCO detection JSON (boxes in pixels, categories from 1) and return its path.

    Every image gets an entry, with or without boxes. Images carry their engine id as the extra
    field ``image_key`` so that ``read_coco`` gives back the same ids.

    Args:
        items: one row per image (image_id; optional file_name, path, width, height).
        boxes: box table; boxes of images not in items are skipped.
        box_classes: class names, index = class id.
        out_path: the JSON file to write.
        sizes: image id -> (width, height) in pixels; None: the items' width/height columns.
        score_column: a box column written as each annotation's "score" (pseudo labels, predictions).
    """
    ids = _image_ids(items, "COCO export")
    if score_column and score_column not in boxes.columns:
        raise DataError(f"COCO export: the box table has no score column {score_column!r}")
    keep = _checked_boxes(boxes, ids, len(box_classes), "COCO export")
    pixel_sizes = _sizes(items, ids, sizes)
    index_of = {image_id: k + 1 for k, image_id in enumerate(ids)}
    images = [{"id": index_of[i], "file_name": name, "width": pixel_sizes[i][0], "height": pixel_sizes[i][1],
               "image_key": i} for i, name in zip(ids, _file_names(items, ids))]
    data = {
        "info": {"description": "exported by cxr-noisy-student", "version": "1.0"},
        "images": images,
        "annotations": _annotations(keep, index_of, pixel_sizes, score_column),
        "categories": [{"id": k + 1, "name": str(n), "supercategory": "finding"} for k, n in enumerate(box_classes)],
    }
    write_json(out_path, data)
    return Path(out_path)


def _load_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read COCO JSON ({err})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{path}: not a COCO detection file (missing lists {missing})")
    return data


def read_coco(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items (image_id, file_name, width, height) and box table of a COCO JSON.

    Category ids map to 0-based class ids in sorted id order (1..n -> 0..n-1 for our own exports);
    the class names are in ``boxes.attrs["box_classes"]``.
    """
    path = Path(path)
    data = _load_coco(path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: k for k, c in enumerate(cats)}
    images = {img["id"]: img for img in data["images"]}
    key = {i: str(img.get("image_key") or Path(img["file_name"]).stem) for i, img in images.items()}
    columns = ["image_id", "file_name", "width", "height"]
    items = pd.DataFrame([[key[i], img["file_name"], img["width"], img["height"]] for i, img in images.items()],
                         columns=columns)
    rows = []
    for number, ann in enumerate(data["annotations"]):
        img = images.get(ann.get("image_id"))
        if img is None or ann.get("category_id") not in class_of or len(ann.get("bbox", [])) != 4:
            raise DataError(f"{path}, annotation {number}: unknown image/category or bbox is not [x, y, w, h]")
        xyxy = from_coco([ann["bbox"]], img["width"], img["height"])[0]
        rows.append({"image_id": key[img["id"]], "class_id": class_of[ann["category_id"]], **dict(zip(BOX_COLUMNS, xyxy)),
                     "source": ann.get("source", "coco"), "score": ann.get("score", 1.0)})
    boxes = pd.DataFrame(rows, columns=BOX_TABLE_COLUMNS) if rows else empty_boxes()
    boxes = boxes.astype({c: "float32" for c in [*BOX_COLUMNS, "score"]}).astype({"class_id": "int64"})
    boxes.attrs["box_classes"] = tuple(c["name"] for c in cats)
    return items, boxes
