"""Mask CSVs -> the item table's mask columns, every row checked (see :mod:`datasets.masks`).

One reader for every layout: a CSV with ``image_id`` (or SIIM-ACR's ``ImageId``) and either
``mask_file`` (a path relative to the data root) or ``EncodedPixels`` (SIIM-ACR run-length text,
``-1`` for empty). Optional ``positive`` (0/1) or ``<name>_fraction`` (foreground fraction) columns
say what the mask should hold, and an empty mask where they say positive is a bad row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..masks import EMPTY_RLE, FILE_COLUMN, FRACTION_TOLERANCE, ID_COLUMNS, MASK_COLUMNS, RLE_COLUMN, read_mask_file
from ..masks import rle_decode, rle_encode
from ..table import ItemTable, Quarantine
from .common import inside_root, read_csv_checked


def _columns(path: Path, df: pd.DataFrame) -> tuple[str, str]:
    """(id column, mask column) of a mask CSV, or a one-line DataError naming what is expected."""
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    mask_col = next((c for c in (FILE_COLUMN, RLE_COLUMN) if c in df.columns), None)
    if id_col is None or mask_col is None:
        raise DataError(f"{path}: a mask CSV needs an image id column ({' or '.join(ID_COLUMNS)}) and "
                        f"{FILE_COLUMN!r} or {RLE_COLUMN!r}; found columns {[c for c in df.columns if c != '_row']}")
    return id_col, mask_col


def _stated_positive(row: dict) -> tuple[bool | None, float | None, str | None]:
    """What the row says the mask holds: positive or not, and a foreground fraction (or why unreadable)."""
    flag, fraction = row.get("positive", ""), None
    names = [k for k in row if k.endswith("_fraction") and row[k] != ""]
    if names:
        try:
            fraction = float(row[names[0]])
        except ValueError:
            return None, None, f"{names[0]} {row[names[0]]!r} is not a number"
    if flag not in ("", "0", "1"):
        return None, None, f"positive must be 0 or 1, got {flag!r}"
    positive = True if flag == "1" else False if flag == "0" else (fraction > 0 if fraction is not None else None)
    return positive, fraction, None


def _row_mask(row: dict, mask_col: str, root: Path, size: tuple[int, int],
              relative: bool) -> tuple[np.ndarray | None, str, str | None]:
    """(mask, the file it came from or '', problem) for one row."""
    width, height = size
    value = row[mask_col]
    try:
        if mask_col == RLE_COLUMN:
            return rle_decode(value, height=height, width=width, relative=relative), "", None
        if not value:
            return None, "", "empty mask_file"
        path = root / value
        if not inside_root(root, path):
            return None, "", f"mask path {value!r} escapes the data root {root}"
        if not path.is_file():
            return None, "", f"missing mask file {path}"
        return read_mask_file(path, width=width, height=height), str(path.resolve()), None
    except ValueError as exc:
        return None, "", str(exc)


def _check_statement(mask: np.ndarray, row: dict, mask_col: str) -> str | None:
    positive, fraction, problem = _stated_positive(row)
    if problem:
        return problem
    if mask_col == RLE_COLUMN and row[mask_col] not in (EMPTY_RLE, ""):
        positive = True if positive is None else positive
    if positive and not mask.any():
        return "mask is empty but the CSV says the image is positive"
    if positive is False and mask.any():
        return "mask has foreground but the CSV says the image is negative"
    if fraction is not None and abs(float(mask.mean()) - fraction) > FRACTION_TOLERANCE:
        return f"mask covers {mask.mean():.4f} of the image, the CSV says {fraction:.4f} (wrong mask for this image?)"
    return None


def attach_masks(table: ItemTable, root: Path, masks_csv: str, q: Quarantine, *, relative_rle: bool = True) -> ItemTable:
    """The table with its mask columns filled from ``root/masks_csv`` (every row checked).

    Several rows of one image are united (SIIM-ACR's instances); an image with any rejected row is
    not mask-labeled. File masks stay files (the cache reads them); RLE masks are kept as one
    standard (absolute) RLE of the union.
    """
    path = root / masks_csv
    df = read_csv_checked(path, [])
    id_col, mask_col = _columns(path, df)
    items = table.items.set_index("image_id")
    sizes = {i: (int(w), int(h)) for i, w, h in zip(items.index, items["width"], items["height"])}
    union: dict[str, np.ndarray] = {}
    files: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    bad: set[str] = set()
    for row in df.to_dict("records"):
        image_id = row[id_col]
        if image_id not in sizes:
            q.reject(path, row["_row"], image_id, "mask for an absent image: the image id is not in the item table "
                                                 "(or its row was rejected)")
            continue
        mask, source, problem = _row_mask(row, mask_col, root, sizes[image_id], relative_rle)
        problem = problem or _check_statement(mask, row, mask_col)
        if problem:
            q.reject(path, row["_row"], image_id, problem)
            bad.add(image_id)
            continue
        union[image_id] = union[image_id] | mask if image_id in union else mask
        files.setdefault(image_id, []).append(source)
        rows[image_id] = rows.get(image_id, 0) + 1
    return table.replace(items=_mask_columns(table.items, union, files, rows, bad))


def _mask_columns(items: pd.DataFrame, union: dict, files: dict, rows: dict, bad: set) -> pd.DataFrame:
    out = items.copy()
    labeled = [i in union and i not in bad for i in out["image_id"]]
    single_file = {i: f[0] for i, f in files.items() if len(f) == 1 and f[0]}
    out["mask_labeled"] = labeled
    out["mask_path"] = [single_file.get(i, "") if ok else "" for i, ok in zip(out["image_id"], labeled)]
    out["mask_rle"] = [rle_encode(union[i], relative=False) if ok and i not in single_file else ""
                       for i, ok in zip(out["image_id"], labeled)]
    out["mask_instances"] = [rows.get(i, 0) if ok else 0 for i, ok in zip(out["image_id"], labeled)]
    return out


def no_masks(items: pd.DataFrame) -> pd.DataFrame:
    """Items with empty mask columns (a dataset without masks keeps one schema)."""
    return items.assign(mask_labeled=False, mask_path="", mask_rle="", mask_instances=0)[[*items.columns, *MASK_COLUMNS]]
