"""What every stage of one run shares: the config, the run layout, the data, the folds, the device.

A :class:`RunContext` is built whole by ``cycle.data_stage.prepare`` once the data stage is done
(nothing is filled in later), and is read-only but for the list of stage records the run keeps for
its summary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from ..datasets.cache import ImageCache
from ..datasets.mask_cache import MaskCache
from ..datasets.config import PreprocessConfig, fingerprint
from ..datasets.table import ItemTable
from ..loops.executor import Executor, LocalExecutor, StageJob, run_job
from .config import EngineConfig
from .layout import RunLayout

log = logging.getLogger("cxr.cycle")

Loader = Callable[[str], np.ndarray]


def run_stage(layout: RunLayout, records: list, stage_dir: Path, payload: dict, fn: Callable[[Path], Any]) -> dict:
    """Run ``fn`` as the resumable stage ``stage_dir`` (skipped when its fingerprint matches) and
    keep its record (path, seconds, reused) for the run's summary."""
    return keep_record(layout, records, stage_dir, StageJob(stage_dir, fingerprint(payload), fn).run())


def keep_record(layout: RunLayout, records: list, stage_dir: Path, record: dict, where: str = "") -> dict:
    """Add a stage's record (made in this process or by a worker) to the run's records; log it."""
    record["path"] = str(stage_dir.relative_to(layout.root))
    records.append(record)
    verb = "reused" if record["skipped"] else f"done in {record['seconds']:.1f}s{where}"
    log.info("stage %s %s", record["path"], verb)
    return record


@dataclass(frozen=True)
class RunContext:
    cfg: EngineConfig
    layout: RunLayout
    table: ItemTable
    truth: ItemTable | None
    """Hidden truth of the pool (demo, ``unlabeled_truth``): read by evaluation only, never by
    selection or training."""
    folds: pd.Series
    device: torch.device
    records: list = field(default_factory=list)
    unscored_test: frozenset = frozenset()
    """Test images left out of every test metric: duplicates of a training image
    (``folds.test_duplicates: exclude``); they would score what the models memorised."""
    executor: Executor = field(default_factory=LocalExecutor)
    """Where independent stages (the folds of a cross-fit) and per-fold predictions run (run.executor)."""

    def stage(self, stage_dir: Path, payload: dict, fn: Callable[[Path], Any]) -> dict:
        """One stage, run in this process."""
        return run_stage(self.layout, self.records, stage_dir, payload, fn)

    def stages(self, specs) -> list[dict]:
        """Independent stages ``(stage_dir, payload, fn)``: the ones not done go to the executor
        together (which may run them side by side elsewhere: each is written there by the same
        atomic stage code); every record comes back here, in the order given."""
        jobs = [StageJob(d, fingerprint(p), fn) for d, p, fn in specs]
        pending = [i for i, job in enumerate(jobs) if not job.stage.is_done()]
        remote = dict(zip(pending, self.executor.map(run_job, [jobs[i] for i in pending]))) if pending else {}
        where = "" if self.executor.kind == "local" else f" ({self.executor.kind})"
        return [keep_record(self.layout, self.records, job.stage_dir, remote[i] if i in remote else job.run(),
                            where if i in remote else "")
                for i, job in enumerate(jobs)]

    def loader(self, preprocess: PreprocessConfig | None = None) -> Loader:
        """Image loader of the preprocessing cache for these settings (the run's by default)."""
        return ImageCache(self.layout.cache, preprocess or self.cfg.preprocess).load

    def mask_loader(self, size: int | None = None) -> Loader:
        """0/1 mask loader of the mask cache at this size (the run's by default)."""
        return MaskCache(self.layout.cache, size or self.cfg.preprocess.size).load

    @property
    def labeled_ids(self) -> list[str]:
        """Images with ground truth in the folds, in fold-table order."""
        return list(self.folds.index)

    @property
    def box_labeled(self) -> set[str]:
        return set(self.table.items.loc[self.table.items["box_labeled"], "image_id"])

    def ids(self, *roles: str) -> list[str]:
        return self.table.with_role(*roles)["image_id"].tolist()

    def scored_test_ids(self) -> list[str]:
        """The test images every test metric is computed on (the test role less ``unscored_test``)."""
        return [i for i in self.ids("test") if i not in self.unscored_test]
