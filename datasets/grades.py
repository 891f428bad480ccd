"""Ordinal grades (severity scores, diabetic-retinopathy grades): one more column of the item table.

A grade is an integer 0..K-1 on an ordered scale, read from a CSV beside the images (the demo's
``grades.csv``; for the generic format a column of the images CSV itself, e.g. the shared set's
``geographic_mean``). It lives in its own item-table column, :data:`GRADE` (float: NaN where the
grade is unknown), so one dataset can carry a study label and a grade side by side, and an image
without a grade is still a labeled image for the classifier.

Bad grades never stop other labels from being used and are never dropped silently: a grade that
is not a number, not an integer (unless rounding is asked for) or outside 0..K-1 becomes a
quarantine row naming the file, the CSV line and the image (or, with ``on_bad_input: error``, the
one-line DataError), and that image's grade is unknown. An empty cell is simply an unknown grade.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .adapters.common import parse_number, read_csv_checked
from .errors import DataError
from .table import ItemTable, Quarantine

GRADE = "grade"
"""The item-table column holding the integer grade (float dtype; NaN: unknown)."""

Rounding = Literal["none", "nearest"]


@dataclass(frozen=True)
class GradeSource:
    """Where a run's grades come from (built by the grader task from its config section)."""

    csv: str
    """The CSV, relative to the data root, with an ``image_id`` column and ``column``."""
    column: str
    """The column holding the grade."""
    num_grades: int
    """K: valid grades are 0..K-1."""
    rounding: Rounding = "none"
    """none: a non-integer grade is bad input; nearest: round half up (floor(x + 0.5)), for grades
    that are means of several raters."""
    report_absent: bool = True
    """Quarantine grade rows whose image is not in the item table (False when the CSV is the images
    CSV itself, whose rejected rows are already quarantined)."""


def parse_grade(text: str, *, num_grades: int, rounding: Rounding) -> tuple[float, str | None]:
    """One CSV cell -> (grade or NaN, problem or None). Empty: unknown, not a problem.

    >>> parse_grade("2.7", num_grades=9, rounding="nearest")
    (3.0, None)
    """
    try:
        value = parse_number(text)
    except ValueError:
        return np.nan, f"grade {text!r} is not a number"
    if np.isnan(value):
        return np.nan, None
    if not np.isfinite(value):
        return np.nan, f"grade {text!r} is not a finite number"
    if not 0 <= value <= num_grades - 1:  # before rounding: a mean of -0.3 is no grade 0
        return np.nan, f"grade {text} is outside 0..{num_grades - 1} (grader.num_grades {num_grades})"
    if rounding == "nearest":
        value = float(np.floor(value + 0.5))
    elif not float(value).is_integer():
        return np.nan, (f"grade {text!r} is not an integer (grader.grade_rounding: nearest rounds "
                        "means of several raters)")
    return float(value), None


def read_grades(path: Path, source: GradeSource, known_ids: set[str], q: Quarantine) -> pd.Series:
    """Grades by image id (NaN rows left out), each bad row rejected through ``q``.

    Raises:
        DataError: the file is missing or lacks the columns (with a "did you mean").
    """
    if source.num_grades < 2:
        raise DataError(f"{path}: grader.num_grades must be at least 2, got {source.num_grades}")
    df = read_csv_checked(path, ["image_id", source.column])
    grades: dict[str, float] = {}
    for row in df[["_row", "image_id", source.column]].itertuples(index=False):
        line, image_id, cell = row
        if image_id not in known_ids:
            if source.report_absent:
                q.reject(path, line, image_id, "grade for an image that is not in the item table")
            continue
        if image_id in grades:
            q.reject(path, line, image_id, "second grade for the same image (the first is kept)")
            continue
        grade, problem = parse_grade(cell, num_grades=source.num_grades, rounding=source.rounding)
        if problem:
            q.reject(path, line, image_id, problem)
        elif not np.isnan(grade):
            grades[image_id] = grade
    return pd.Series(grades, dtype="float64")


def with_grades(table: ItemTable, root: Path, source: GradeSource, mode: Literal["quarantine", "error"]) -> ItemTable:
    """The table with its :data:`GRADE` column filled from ``root / source.csv`` and the bad rows
    added to its quarantine."""
    q = Quarantine(mode)
    grades = read_grades(Path(root) / source.csv, source, set(table.items["image_id"]), q)
    items = table.items.assign(**{GRADE: table.items["image_id"].map(grades).astype("float64")})
    quarantine = pd.concat([table.quarantine, q.frame()], ignore_index=True) if q.rows else table.quarantine
    return table.replace(items=items, quarantine=quarantine)


def grades_of(table: ItemTable, image_ids) -> np.ndarray:
    """(N,) int grades of these images, in order; DataError naming one whose grade is unknown."""
    column = table.items.set_index("image_id")[GRADE] if GRADE in table.items else None
    if column is None:
        raise DataError(f"the item table has no {GRADE!r} column (grades were not read for this run)")
    values = column.loc[list(image_ids)].to_numpy(np.float64)
    if np.isnan(values).any():
        raise DataError(f"image {list(image_ids)[int(np.flatnonzero(np.isnan(values))[0])]}: grade unknown")
    return values.astype(int)
