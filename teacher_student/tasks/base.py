"""The task interface every kind (classifier, detector, ...) implements.

Why one interface: the cycle -- teachers, out-of-fold and pool predictions, pseudo labels,
students -- is the same for every kind of label; only what a model is, what a prediction looks
like and how a pseudo label is chosen differ. ``cycle.generation`` drives any task through
``loops.crossfit.cross_fit`` (which checks the out-of-fold contract once for all of them), and the
selection and scoring stages call the same methods on each.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ...datasets.table import ItemTable
from ...loops.crossfit import FoldPlan
from ..context import RunContext


def fold_seed(run_seed: int, gen: int, fold: int) -> int:
    """The seed of one fold model: distinct per run seed, generation and fold, and stable."""
    return run_seed * 1000 + gen * 10 + fold


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class Task(abc.ABC):
    """One kind of label through the cycle. Built per run (and per reference table: the oracle
    passes the table with the pool's truth filled in)."""

    name: str = ""

    def __init__(self, ctx: RunContext, table: ItemTable | None = None):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.table = table if table is not None else ctx.table

    # ------------------------------------------------------------------ which images
    @abc.abstractmethod
    def labeled_ids(self) -> list[str]:
        """Images whose labels for this task are ground truth: trained on and predicted OOF."""

    @abc.abstractmethod
    def pool_ids(self) -> list[str]:
        """Images every fold model predicts (the unlabeled pool, the test part...)."""

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def payload(self, gen: int) -> dict:
        """The config slice that makes this task's models (keys every fold and prediction stage)."""

    @abc.abstractmethod
    def fold_plans(self, gen: int, pseudo_dir: Path | None, teacher: Path | None,
                   extra_ids: Sequence[str] = ()) -> list[FoldPlan]:
        """One plan per fold: labeled images of the other folds (+ pseudo labels, + extra ids)."""

    @abc.abstractmethod
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict: ...

    # ------------------------------------------------------------------ prediction
    @abc.abstractmethod
    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame: ...

    @abc.abstractmethod
    def write_predictions(self, oof: pd.DataFrame, pool: pd.DataFrame, out_dir: Path) -> dict: ...

    # ------------------------------------------------------------------ pseudo labels and scores
    @abc.abstractmethod
    def select(self, teachers: dict[str, Path], out_dir: Path, cycle: int) -> dict:
        """Choose this task's pseudo labels from the teachers' predictions (task name -> dir)."""

    @abc.abstractmethod
    def score(self, pred_dir: Path) -> dict:
        """Metrics of a generation's predictions: OOF, held-out test, and the pool's hidden truth."""

    def model_name(self, gen: int) -> str:
        raise NotImplementedError
