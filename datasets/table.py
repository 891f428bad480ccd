"""The canonical item table every adapter produces and every stage reads.

Two pandas tables and a little metadata, kept in one frozen object:

``items`` (one row per image)
    image_id (str, unique), patient_id (str), path (str, absolute, inside the data root),
    role ("labeled" | "unlabeled" | "test"), has_study_label (bool), box_labeled (bool: the image's
    boxes are ground truth for detection; False means "not annotated", not "no findings"), and one
    float column ``y:<class>`` per study class holding the study-level target (one-hot for
    multiclass, multi-hot for multilabel; NaN where the image has no study label).

``boxes`` (one row per box)
    image_id, class_id (0-based int into ``box_classes``), x_min, y_min, x_max, y_max (normalized,
    float32), source (who drew it: a radiologist id, "gt", "wbf(R8,R9)", "pseudo"), score (1.0 for
    ground truth).

``quarantine`` (one row per rejected input)
    file, row, image_id, problem: every bad input goes here (or raises DataError) -- never dropped
    silently. The run's log and report print it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .atomic import read_json, read_table, write_json, write_table
from .boxes import BOX_COLUMNS
from .errors import DataError

ROLES = ("labeled", "unlabeled", "test")
ITEM_COLUMNS = ["image_id", "patient_id", "path", "role", "has_study_label", "box_labeled"]
BOX_TABLE_COLUMNS = ["image_id", "class_id", *BOX_COLUMNS, "source", "score"]
QUARANTINE_COLUMNS = ["file", "row", "image_id", "problem"]


def label_column(name: str) -> str:
    return f"y:{name}"


def empty_boxes() -> pd.DataFrame:
    df = pd.DataFrame({c: pd.Series(dtype="float32") for c in BOX_COLUMNS})
    df.insert(0, "class_id", pd.Series(dtype="int64"))
    df.insert(0, "image_id", pd.Series(dtype="str"))
    df["source"] = pd.Series(dtype="str")
    df["score"] = pd.Series(dtype="float32")
    return df[BOX_TABLE_COLUMNS]


def empty_quarantine() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in QUARANTINE_COLUMNS})


class Quarantine:
    """Collects bad rows; in 'error' mode the first one raises DataError instead.

    Adapters call ``reject(file, row, image_id, problem)`` for every problem they find, so both modes
    share one code path and one message format.
    """

    def __init__(self, mode: Literal["quarantine", "error"] = "quarantine"):
        self.mode = mode
        self.rows: list[dict] = []

    def reject(self, file: str | Path, row: int | None, image_id: str | None, problem: str) -> None:
        entry = {"file": str(file), "row": row, "image_id": image_id, "problem": problem}
        if self.mode == "error":
            raise DataError(format_problem(entry))
        self.rows.append(entry)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=QUARANTINE_COLUMNS) if self.rows else empty_quarantine()


def format_problem(entry: dict) -> str:
    """"<file>, row <n> (image <id>): <problem>", leaving out a row or id the entry does not have
    (also when a table read back holds them as NaN: never "row nan" or "row 93.0")."""
    where = str(entry["file"])
    row = entry.get("row")
    if row is not None and not pd.isna(row):
        where += f", row {int(row)}"
    if entry.get("image_id") is not None and not pd.isna(entry["image_id"]) and entry["image_id"] != "":
        where += f" (image {entry['image_id']})"
    return f"{where}: {entry['problem']}"


@dataclass(frozen=True)
class ItemTable:
    items: pd.DataFrame
    boxes: pd.DataFrame
    study_classes: tuple[str, ...]
    box_classes: tuple[str, ...]
    label_mode: Literal["multiclass", "multilabel"] = "multiclass"
    normal_class: str | None = None
    quarantine: pd.DataFrame = field(default_factory=empty_quarantine)

    # ------------------------------------------------------------------ views
    @property
    def label_columns(self) -> list[str]:
        return [label_column(c) for c in self.study_classes]

    def study_targets(self, image_ids) -> np.ndarray:
        """(N, C) float32 study targets of these images, in the given order."""
        idx = self.items.set_index("image_id").loc[list(image_ids), self.label_columns]
        return idx.to_numpy(dtype=np.float32)

    def with_role(self, *roles: str) -> pd.DataFrame:
        return self.items[self.items["role"].isin(roles)]

    def boxes_of(self, image_ids) -> pd.DataFrame:
        return self.boxes[self.boxes["image_id"].isin(set(image_ids))]

    def abnormal_targets(self, image_ids) -> np.ndarray:
        """1 where the study label says abnormal (anything but the normal class), NaN if unknown."""
        if not self.normal_class:
            raise DataError("this dataset names no normal class: set data.normal_class")
        y = self.items.set_index("image_id").loc[list(image_ids), label_column(self.normal_class)]
        return (1.0 - y.to_numpy(dtype=np.float64)).astype(np.float32)

    def replace(self, **changes) -> "ItemTable":
        return replace(self, **changes)

    def validate(self) -> "ItemTable":
        """Check the invariants every stage relies on; raise DataError naming the first breach."""
        missing = [c for c in ITEM_COLUMNS + self.label_columns if c not in self.items.columns]
        if missing:
            raise DataError(f"item table lacks columns {missing}")
        dup = self.items["image_id"][self.items["image_id"].duplicated()]
        if len(dup):
            raise DataError(f"item table: duplicated image_id {dup.iloc[0]!r}")
        bad_roles = set(self.items["role"]) - set(ROLES)
        if bad_roles:
            raise DataError(f"item table: unknown roles {sorted(bad_roles)} (expected {ROLES})")
        if self.normal_class and self.normal_class not in self.study_classes:
            raise DataError(f"normal class {self.normal_class!r} is not one of {list(self.study_classes)}")
        orphan = set(self.boxes["image_id"]) - set(self.items["image_id"])
        if orphan:
            raise DataError(f"box table: boxes for unknown images {sorted(orphan)[:3]}")
        if len(self.boxes):
            cls = self.boxes["class_id"]
            if cls.min() < 0 or cls.max() >= len(self.box_classes):
                raise DataError(f"box table: class ids outside 0..{len(self.box_classes) - 1}")
        return self

    def summary(self) -> dict:
        roles = self.items["role"].value_counts().to_dict()
        return {
            "images": int(len(self.items)),
            "roles": {k: int(v) for k, v in roles.items()},
            "study_classes": list(self.study_classes),
            "box_classes": list(self.box_classes),
            "boxes": int(len(self.boxes)),
            "box_labeled_images": int(self.items["box_labeled"].sum()),
            "mask_labeled_images": int(self.items["mask_labeled"].sum()) if "mask_labeled" in self.items else 0,
            "quarantined": int(len(self.quarantine)),
        }


def save_table(directory: str | Path, table: ItemTable) -> None:
    """Write the table as items.csv, boxes.csv, quarantine.csv and table.json (atomically each)."""
    directory = Path(directory)
    write_table(directory / "items.csv", table.items)
    write_table(directory / "boxes.csv", table.boxes)
    write_table(directory / "quarantine.csv", table.quarantine)
    write_json(directory / "table.json", {"study_classes": list(table.study_classes),
                                          "box_classes": list(table.box_classes),
                                          "label_mode": table.label_mode, "normal_class": table.normal_class})


def load_table(directory: str | Path) -> ItemTable:
    directory = Path(directory)
    meta = read_json(directory / "table.json")
    items = read_table(directory / "items.csv")
    for col in ("has_study_label", "box_labeled"):
        items[col] = items[col].astype(bool)
    if "mask_labeled" in items:  # datasets.masks: the optional mask columns
        items["mask_labeled"] = items["mask_labeled"].astype(bool)
        items[["mask_path", "mask_rle"]] = items[["mask_path", "mask_rle"]].fillna("").astype(str)
    boxes = read_table(directory / "boxes.csv")
    boxes[BOX_COLUMNS] = boxes[BOX_COLUMNS].astype("float32")
    return ItemTable(items=items, boxes=boxes, study_classes=tuple(meta["study_classes"]),
                     box_classes=tuple(meta["box_classes"]), label_mode=meta["label_mode"],
                     normal_class=meta["normal_class"], quarantine=load_quarantine(directory / "quarantine.csv"))


def load_quarantine(path: str | Path) -> pd.DataFrame:
    """quarantine.csv with its row numbers as integers (missing: <NA>), never floats."""
    q = read_table(path)
    q["row"] = pd.to_numeric(q["row"]).astype("Int64")
    return q
