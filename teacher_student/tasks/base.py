"""The task interface every kind (classifier, detector, ...) implements.

Why one interface: the cycle -- teachers, out-of-fold and pool predictions, pseudo labels,
students -- is the same for every kind of label; only what a model is, what a prediction looks
like and how a pseudo label is chosen differ. ``cycle.generation`` drives any task through
``loops.crossfit.cross_fit`` (which checks the out-of-fold contract once for all of them), and the
selection and scoring stages call the same methods on each.
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ...datasets.errors import DataError
from ...datasets.table import ItemTable
from ...loops.crossfit import FoldPlan
from ..config import finetune_epochs
from ..context import RunContext
from ..fusion import MODEL_SEPARATOR
from ..layout import fold_of_model

log = logging.getLogger("cxr.cycle")


def fold_seed(run_seed: int, gen: int, fold: int) -> int:
    """The seed of one fold model: distinct per run seed, generation and fold, and stable."""
    return run_seed * 1000 + gen * 10 + fold


def of_fold(table: pd.DataFrame | None, fold: int) -> pd.DataFrame | None:
    """The rows one fold model made (a per-fold prediction table's ``fold`` column), without it."""
    if table is None:
        return None
    return table[table["fold"] == fold].drop(columns="fold")


def assert_fold_lineage(fold: int, models: Iterable[str], threshold_folds: Iterable[int], *, where: Path) -> None:
    """Student fold k may learn only from teacher fold k: every pseudo label it reads must come from
    fold-k models, and the thresholds that chose them from OOF predictions of the other folds.

    Raises:
        DataError: naming the first model or fold that would carry fold k's labels into it.
    """
    for tags in set(map(str, models)):
        for tag in tags.split(MODEL_SEPARATOR):
            if fold_of_model(tag) != fold:
                raise DataError(f"{where}: pseudo labels for student fold {fold} come from model {tag!r}, which saw "
                                f"fold {fold}'s labels (leak)")
    if fold in set(int(f) for f in threshold_folds):
        raise DataError(f"{where}: thresholds for student fold {fold} were chosen on fold {fold}'s own OOF "
                        "predictions (leak)")


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
    def enabled(self) -> bool:
        """Whether this run has the labels this kind trains on (e.g. a detector needs boxes)."""
        return True

    @abc.abstractmethod
    def labeled_ids(self) -> list[str]:
        """Images whose labels for this task are ground truth: trained on and predicted OOF."""

    @abc.abstractmethod
    def pool_ids(self) -> list[str]:
        """The images a generation's ensemble predicts (the unlabeled pool, the test part...)."""

    def every_fold_ids(self) -> list[str]:
        """Images every fold model predicts: the pool, plus what the task needs per fold model."""
        return self.pool_ids()

    def images_without(self, has_label: pd.Series) -> list[str]:
        """The pool of a task kind: the run's unlabeled and test images, and its labeled images
        without this kind's label (``has_label``: one flag per item row)."""
        items = self.ctx.table.items
        pool = items["role"].isin(["unlabeled", "test"]) | (items["role"].eq("labeled") & ~has_label.astype(bool))
        return items.loc[pool, "image_id"].tolist()

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

    @abc.abstractmethod
    def model_name(self, gen: int) -> str:
        """The ladder's model of a generation."""

    @abc.abstractmethod
    def student_steps(self) -> float:
        """Students' optimizer steps as a multiple of the teacher's (this task's config)."""

    def run_name(self, out_dir: Path, gen: int, fold: int) -> str:
        """How logs, progress bars and training errors name a fold model: "classifier gen 1 fold 0",
        or for a reference model (trained in its own folder) "classifier oracle fold 0"."""
        owner = Path(out_dir).parent.parent.name  # <out>/<gen<g> | oracle | ablation>/<task>/<stage dir>
        where = f"gen {gen}" if owner == f"gen{gen}" else owner
        return f"{self.name} {where} fold {fold}"

    def tensorboard_dir(self, out_dir: Path, fold: int) -> Path | None:
        """Where fold ``fold``'s live TensorBoard scalars go (``out_dir`` is the fold stage's
        temporary directory, swapped in as ``fold<k>`` beside it); None when run.tensorboard is off."""
        if not self.cfg.run.tensorboard:
            return None
        return self.ctx.layout.tensorboard_of(Path(out_dir).parent / f"fold{fold}")

    def finetune_section(self):
        """The config section holding this task's ``finetune`` and ``finetune_lr``; None: the task
        has no fine-tuning phase."""
        return None

    def finetune_payload(self, gen: int) -> dict:
        """The fold plan's fingerprint entry of the fine-tuning phase (empty when there is none, so
        runs without it keep their fingerprints)."""
        section = self.finetune_section()
        if gen < 1 or section is None or not section.finetune:
            return {}
        return {"finetune": [section.finetune, section.finetune_lr]}

    def training_phases(self, gen: int, epochs: int, images: int, labeled_images: int,
                        lr: float) -> list[tuple[int, float, bool]]:
        """``(epochs, peak lr, labeled only)`` per phase of a fold model: one phase for teachers and
        tasks without fine-tuning; a student's (and the references') ``finetune`` share of the steps
        goes last to its labeled rows, at ``finetune_lr`` x ``lr`` (``config.finetune_epochs``)."""
        section = self.finetune_section()
        share = section.finetune if section is not None and gen >= 1 else 0.0
        mixed, tuned = finetune_epochs(epochs, images, labeled_images, share)
        return [(mixed, lr, False)] + ([(tuned, lr * section.finetune_lr, True)] if tuned else [])

    def steps_factor(self, gen: int, given: float | None = None) -> float:
        """Steps of a fold model as a multiple of the teacher's: ``given`` (the oracle's budget), else
        1 for the teacher and the task's student_steps for students and the ablation."""
        if given is not None:
            return float(given)
        return 1.0 if gen == 0 else float(self.student_steps())


def warn_starving(task: str, models: Sequence[str], info: dict, *, kept: dict | None = None) -> None:
    """One log line per selection naming its starving classes and what its fallback (the record's
    ``fallback_mode``) did with them (``kept``: the selection's count per class): the student would
    otherwise learn nothing of them, or learn from weak evidence, silently. Classes starving for the
    same reason share the line (a detector with 14 classes and no OOF box would otherwise print 14
    near-identical lines per fold)."""
    starving = info.get("starving", {})
    if not starving:
        return
    fallback, kept, mode = info.get("fallback", {}), kept or {}, info.get("fallback_mode", "top_k")
    by_reason: dict[str, list[str]] = {}
    for name, why in starving.items():
        if fallback.get(name):
            remedy = f"top_k fallback kept {fallback[name]}"
        elif mode == "drop":
            remedy = "none kept (fallback drop)"
        elif kept.get(name):
            remedy = f"{kept[name]} kept, flagged (fallback {mode})"
        else:
            remedy = "keeps nothing"
        by_reason.setdefault(f"{why}; {remedy}", []).append(repr(name))
    text = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
    log.warning("%s pseudo labels from %s: %d class(es) starve: %s", task, "+".join(models), len(starving), text)


def student_totals(fold_infos: list[dict], count_key: str = "kept_per_class") -> dict:
    """What the students of a cycle trained on, summed over their folds' own selections: counts
    per class, the starving classes (with the folds they starve in) and the precision against
    hidden truth weighted by each fold's count."""
    per_class: dict[str, int] = {}
    starving: dict[str, list[str]] = {}
    weighted, total = 0.0, 0
    for fold, info in enumerate(fold_infos):
        for name, n in (info.get(count_key) or {}).items():
            per_class[name] = per_class.get(name, 0) + int(n)
        for name, why in (info.get("starving") or {}).items():
            starving.setdefault(name, []).append(f"fold {fold}: {why}")
        n = sum((info.get(count_key) or {}).values())
        if info.get("precision") is not None and n:
            weighted, total = weighted + info["precision"] * n, total + n
    return {count_key: per_class, "total": int(sum(per_class.values())), "starving": starving,
            "precision": weighted / total if total else None}

