"""Reading one run folder: its config, a cycle's pseudo labels and its teacher's predictions.

Why a module of its own: the report and the exports (:mod:`teacher_student.exports`) read the same
tables and must fail the same way -- one-line :class:`DataError` naming what is missing -- when a
run or a cycle does not exist yet. Every path comes from :class:`RunLayout`. Cycle ``c``'s pseudo
labels (``RunLayout.pseudo(c)``) were made by generation ``c - 1``, whose predictions are read too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ...datasets.atomic import read_json, read_table
from ...datasets.boxes import BOX_COLUMNS
from ...datasets.errors import ConfigError, DataError
from ...datasets.table import ItemTable, load_table
from ..config import EngineConfig, load_config
from ..layout import (BOX_IMAGES, BOX_OOF_MATCHED, BOX_PSEUDO, BOX_PSEUDO_INFO, CLASS_PSEUDO, CLASS_PSEUDO_INFO,
                      CLASS_SELECTION, CLASSIFIER, DETECTOR, FOLDS, MASK_PSEUDO, OOF, POOL, POOL_FOLDS, POOL_FUSED,
                      TABLE_META, RunLayout, pseudo_fold_dir)
from ..pseudo import LabelMode

Loader = Callable[[str], np.ndarray]


def load_run_config(run_dir: Path) -> tuple[EngineConfig, str | None]:
    """The run's resolved config, or the defaults with a note saying why it could not be read."""
    path = RunLayout(run_dir).config
    if not path.exists():
        return EngineConfig(), f"{path} is missing: config defaults assumed"
    try:
        return load_config(path), None
    except (ConfigError, OSError, ValueError) as err:
        return EngineConfig(), f"{path}: {err}; config defaults assumed"


def optional_table(path: Path) -> pd.DataFrame | None:
    """The table, or None when the stage that writes it did not run (no detector, no pool)."""
    return read_table(path) if path.exists() else None


_BOX_NUMBERS = ("class_id", *BOX_COLUMNS, "score", "n_models", "fold")
_SELECTION_NUMBERS = ("class_index", "confidence", "threshold", "copies", "cycle")


def numeric_table(path: Path, numbers: Sequence[str]) -> pd.DataFrame | None:
    """A table with numeric columns also when it has no rows: read_csv types the columns of a
    header-only file as object, on which ``nlargest`` fails (a cycle that kept no pseudo box, a
    dataset with no unlabeled pool for the classifier)."""
    df = optional_table(path)
    if df is None:
        return None
    df = df.astype({c: "float64" for c in numbers if c in df.columns and df[c].dtype == object})
    return df.astype({"kept": bool}) if "kept" in df.columns and df.empty else df


def box_table(path: Path) -> pd.DataFrame | None:
    """A box table (:func:`numeric_table` with the box columns numeric)."""
    return numeric_table(path, _BOX_NUMBERS)


def selection_table(path: Path) -> pd.DataFrame | None:
    """A ``class_selection.csv`` (:func:`numeric_table` with its score columns numeric)."""
    return numeric_table(path, _SELECTION_NUMBERS)


def optional_json(path: Path) -> dict | None:
    """The record, or None when it is not written (yet): summary.json exists only after a run ends."""
    return read_json(path) if path.exists() else None


def check_cycle(run_dir: Path, cycle: int) -> Path:
    """The cycle's pseudo directory, or a one-line DataError saying what is missing."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not layout.is_run():
        raise DataError(f"{run_dir}: not a run directory (no data/table.json); give the --out of a run")
    pseudo_dir = layout.pseudo(cycle)
    if not (pseudo_dir / CLASS_SELECTION).exists() and not (pseudo_dir / MASK_PSEUDO).exists():
        done = layout.cycles_with_pseudo_labels()
        raise DataError(f"{pseudo_dir}: cycle {cycle} has not made pseudo labels yet "
                        f"(cycles run: {', '.join(map(str, done)) or 'none'})")
    return pseudo_dir


@dataclass
class CycleData:
    """Everything one cycle's report reads, loaded once."""

    run_dir: Path
    cycle: int
    cfg: EngineConfig
    notes: list[str]
    table: ItemTable
    truth: ItemTable | None
    folds: pd.Series
    oof: pd.DataFrame
    pool: pd.DataFrame | None
    pool_folds: pd.DataFrame | None
    selection: pd.DataFrame
    class_pseudo: pd.DataFrame
    class_info: dict
    matched: pd.DataFrame | None = None
    box_pseudo: pd.DataFrame | None = None
    box_images: pd.DataFrame | None = None
    box_info: dict | None = None
    fused: pd.DataFrame | None = None
    summary: dict | None = None
    fold_infos: dict[str, list[dict]] = field(default_factory=dict)
    """Per task, the selection info of every student fold (``pseudo/fold<k>/*.json``): what the
    students trained on, as opposed to the ensemble's selection the rest of the page judges."""
    metrics: dict[int, dict] = field(default_factory=dict)
    """Generation -> its scores (``gen<g>/metrics.json``), for the generations written so far."""

    @property
    def classes(self) -> list[str]:
        return list(self.table.study_classes)

    @property
    def mode(self) -> LabelMode:
        return self.table.label_mode

    @property
    def has_boxes(self) -> bool:
        return self.matched is not None and self.box_pseudo is not None and bool(self.table.box_classes)

    @property
    def unlabeled_ids(self) -> list[str]:
        return self.table.with_role("unlabeled")["image_id"].tolist()

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir, self.cfg.run.cache_dir)


def read_cycle(run_dir: str | Path, cycle: int) -> CycleData:
    """Load one cycle's pseudo labels, its teacher's predictions and the run's data."""
    run_dir = Path(run_dir)
    pseudo_dir = check_cycle(run_dir, cycle)
    cfg, note = load_run_config(run_dir)
    layout = RunLayout(run_dir, cfg.run.cache_dir)
    teacher = layout.predictions(cycle - 1, CLASSIFIER)
    if not (teacher / OOF).exists():
        raise DataError(f"{teacher / OOF}: the teacher of cycle {cycle} has no OOF predictions")
    d = CycleData(
        run_dir=run_dir, cycle=cycle, cfg=cfg, notes=[note] if note else [], table=load_table(layout.data),
        truth=load_table(layout.truth) if (layout.truth / TABLE_META).exists() else None,
        folds=read_table(layout.data / FOLDS).set_index("image_id")["fold"],
        oof=read_table(teacher / OOF), pool=optional_table(teacher / POOL),
        pool_folds=optional_table(teacher / POOL_FOLDS), selection=selection_table(pseudo_dir / CLASS_SELECTION),
        class_pseudo=read_table(pseudo_dir / CLASS_PSEUDO),
        class_info=optional_json(pseudo_dir / CLASS_PSEUDO_INFO) or {},
        summary=optional_json(layout.summary))
    d.fold_infos = {name: fold_infos(pseudo_dir, file) for name, file in ((CLASSIFIER, CLASS_PSEUDO_INFO),
                                                                         (DETECTOR, BOX_PSEUDO_INFO))}
    d.metrics = generation_metrics(layout, cycle, d.summary)
    if (pseudo_dir / BOX_PSEUDO).exists():
        d.matched = box_table(pseudo_dir / BOX_OOF_MATCHED)
        d.box_pseudo = box_table(pseudo_dir / BOX_PSEUDO)
        d.box_images = optional_table(pseudo_dir / BOX_IMAGES)
        d.box_info = optional_json(pseudo_dir / BOX_PSEUDO_INFO) or {}
        d.fused = box_table(layout.predictions(cycle - 1, DETECTOR) / POOL_FUSED)
    return d


def default_loader(run_dir: Path, cfg: EngineConfig) -> Loader:
    """The run's preprocessing cache (``run.cache_dir`` or ``<run>/cache``) as an image loader."""
    from ...datasets.cache import ImageCache

    return ImageCache(RunLayout(run_dir, cfg.run.cache_dir).cache, cfg.preprocess).load


def fold_infos(pseudo_dir: Path, name: str) -> list[dict]:
    """The per-fold selection records (fold 0, 1, ... while they exist); empty for older runs."""
    out = []
    while (path := pseudo_fold_dir(pseudo_dir, len(out)) / name).exists():
        out.append(read_json(path))
    return out


def generation_metrics(layout: RunLayout, cycle: int, summary: dict | None) -> dict[int, dict]:
    """Scores of generations 0..cycle: ``gen<g>/metrics.json`` (written as each generation ends),
    else the generation's record in summary.json (runs from before metrics.json existed)."""
    known = {g.get("generation"): g for g in (summary or {}).get("generations", [])}
    out = {}
    for gen in range(cycle + 1):
        record = optional_json(layout.metrics(gen))
        if record is not None:
            out[gen] = {**record, "source": "metrics.json"}
        elif gen in known:
            out[gen] = {**known[gen], "source": "summary.json"}
    return out
