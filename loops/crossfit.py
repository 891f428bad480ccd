"""The one cross-fit loop: k fold models, out-of-fold predictions, pool predictions.

Modelled on scikit-learn's ``cross_val_predict``: each labeled image is predicted exactly once, by
the fold model that was fitted without it, and the loop -- not each model kind -- checks that
contract, so every task kind (classifier, detector, ...) gets the same guarantee from one place.
Every fold model also predicts the pool (images that are not out-of-fold), which is what a fold
ensemble and its pseudo labels are made of.

The loop knows nothing of what is trained: an estimator (see :class:`FoldEstimator`) fits one
fold from a :class:`FoldPlan`, predicts images with one fold model, and turns the per-fold
prediction tables into its output files. Each fold and the prediction step are resumable stages
run through the caller's runner, keyed by the plan's fingerprint payload; the folds are
independent, so the runner's executor (``loops.executor``) may train them side by side, in other
processes or on other machines, and each fold model predicts where the executor puts it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pandas as pd

from ..datasets.errors import DataError
from ..datasets.progress import Progress
from .executor import Executor
from .stages import file_digest

PREDICT_CHUNK = 256
"""Images per predict call (see _predict_in_chunks)."""
TRAIN_IDS = "train_ids.txt"
"""Written into every fold directory by the loop: the fold model's distinct training images."""

StageSpec = tuple[Path, dict, Callable[[Path], Any]]
"""``(stage_dir, payload, fn)``: a resumable stage, keyed by the fingerprint of ``payload``."""


class StageRunner(Protocol):
    """What runs the loop's stages (``teacher_student.context.RunContext``): records, resumes, executes."""

    executor: Executor

    def stage(self, stage_dir: Path, payload: dict, fn: Callable[[Path], Any]) -> dict:
        """Run one stage in this process (skipped when done); return its record."""

    def stages(self, specs: Sequence[StageSpec]) -> list[dict]:
        """Run independent stages through the executor (in parallel where it can); their records."""


@dataclass(frozen=True)
class FoldPlan:
    """What one fold model trains on.

    ``train`` is the estimator's own training set (targets, boxes, copies...); ``train_ids`` its
    distinct images, which the out-of-fold check reads back; ``payload`` a JSON-able description
    of the training set whose fingerprint decides whether a finished fold can be reused.
    """

    fold: int
    train: Any
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    epochs: int
    payload: dict = field(default_factory=dict)
    patience: int = 0
    """Early stopping patience in epochs (0: the estimator's own setting)."""


class FoldEstimator(Protocol):
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict:
        """Train one fold model into ``out_dir``; return a JSON-able record."""

    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame:
        """Predictions of the fold model in ``fold_dir`` for these images (an ``image_id`` column)."""

    def write_predictions(self, oof: pd.DataFrame, pool: pd.DataFrame, out_dir: Path) -> dict:
        """Write the generation's prediction files from the per-fold tables (a ``fold`` column)."""


@dataclass(frozen=True, eq=False)
class CrossFitJob:
    """One cross-fit: an estimator, its fold plans, the images it predicts, where it goes.

    Args:
        folds: fold of every labeled image (index image_id).
        oof_ids: the images to predict out of fold (each by the model of its own fold).
        pool_ids: the images every fold model predicts.
        payload: the config slice shared by every stage of this cross-fit (model, noise, seed...).
    """

    estimator: FoldEstimator
    plans: Sequence[FoldPlan]
    folds: pd.Series
    oof_ids: Sequence[str]
    pool_ids: Sequence[str]
    task_dir: Path
    payload: dict

    @property
    def predictions(self) -> Path:
        return Path(self.task_dir) / PREDICTIONS

    def fold_stages(self) -> list[StageSpec]:
        """One stage per fold model, ``task_dir/fold<k>``, keyed by the shared payload and the fold's plan."""
        specs = []
        for plan in self.plans:
            payload = {**self.payload, "fold": plan.fold, **plan.payload, "val": list(plan.val_ids),
                       "epochs": plan.epochs, "patience": plan.patience}
            specs.append((Path(self.task_dir) / f"fold{plan.fold}", payload, functools.partial(_fit, self.estimator, plan)))
        return specs

    def prediction_stage(self, executor: Executor) -> StageSpec:
        """The stage predicting OOF + pool with the fold models, keyed by their outputs (so the fold
        stages must be done: their files are digested). Each fold model predicts in the executor."""
        fold_dirs = {plan.fold: Path(self.task_dir) / f"fold{plan.fold}" for plan in self.plans}
        payload = {**self.payload, "models": file_digest(*fold_dirs.values()), "pool": list(self.pool_ids)}
        return (self.predictions, payload,
                lambda d: _predict(self.estimator, fold_dirs, self.folds, self.oof_ids, self.pool_ids, d, executor))


def cross_fit(*jobs: CrossFitJob, runner: StageRunner) -> list[Path]:
    """Fit every fold of every job (one stage each), then predict OOF + pool (one stage per job);
    return the predictions dirs, in job order.

    The folds of all jobs are independent, so a parallel executor gets all of them at once; the
    local one runs job after job, folds then predictions, as the engine always has (the order in
    which a killed run left its stages).
    """
    batches = [jobs] if runner.executor.kind != "local" else [[job] for job in jobs]
    for batch in batches:
        runner.stages([spec for job in batch for spec in job.fold_stages()])
        for job in batch:
            runner.stage(*job.prediction_stage(runner.executor))
    return [job.predictions for job in jobs]


PREDICTIONS = "predictions"


def _fit(estimator: FoldEstimator, plan: FoldPlan, out_dir: Path) -> dict:
    (out_dir / TRAIN_IDS).write_text("\n".join(sorted(set(plan.train_ids))) + "\n")
    return estimator.fit_fold(plan, out_dir)


def _predict(estimator: FoldEstimator, fold_dirs: dict[int, Path], folds: pd.Series, oof_ids: Sequence[str],
             pool_ids: Sequence[str], out_dir: Path, executor: Executor) -> dict:
    assignment = {k: [i for i in oof_ids if folds[i] == k] for k in fold_dirs}
    assert_out_of_fold(assignment, folds, oof_ids, {k: trained_on(d) for k, d in fold_dirs.items()},
                       where=out_dir.parent.parent / out_dir.parent.name)
    if executor.kind == "local":  # in this process: one progress bar over every fold's images
        oof_parts, pool_parts = _predict_here(estimator, fold_dirs, assignment, pool_ids, out_dir)
    else:
        items = [(k, fold_dir, assignment[k], list(pool_ids)) for k, fold_dir in fold_dirs.items()]
        parts = executor.map(functools.partial(_predict_fold, estimator), items)
        oof_parts = [oof for oof, _ in parts if oof is not None]
        pool_parts = [pool for _, pool in parts if pool is not None]
    oof = pd.concat(oof_parts, ignore_index=True) if oof_parts else pd.DataFrame(columns=["image_id", "fold"])
    pool = pd.concat(pool_parts, ignore_index=True) if pool_parts else pd.DataFrame(columns=["image_id", "fold"])
    return estimator.write_predictions(oof, pool, out_dir)


def _predict_here(estimator: FoldEstimator, fold_dirs: dict[int, Path], assignment: dict[int, list[str]],
                  pool_ids: Sequence[str], out_dir: Path) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """Every fold model's OOF and pool predictions in this process, with one progress bar."""
    oof_parts, pool_parts = [], []
    total = sum(map(len, assignment.values())) + len(fold_dirs) * len(pool_ids)
    where = f"{out_dir.parent.parent.name}/{out_dir.parent.name}/predictions"
    with Progress(total, where, "img") as bar:
        for k, fold_dir in fold_dirs.items():
            if assignment[k]:
                oof_parts.append(_predict_in_chunks(estimator, fold_dir, k, assignment[k], bar))
            if pool_ids:
                pool_parts.append(_predict_in_chunks(estimator, fold_dir, k, list(pool_ids), bar))
    return oof_parts, pool_parts


def _predict_in_chunks(estimator: FoldEstimator, fold_dir: Path, fold: int, ids: list[str], bar: Progress) -> pd.DataFrame:
    """One fold model's predictions of ``ids``, PREDICT_CHUNK images per call so that the bar moves.

    The chunk is a multiple of every batch size in use (8 ... 64), so batches -- and therefore the
    numbers -- are those of one call over all images; the fold model is loaded once per chunk,
    which is small next to predicting 256 images.
    """
    parts = []
    for start in range(0, len(ids), PREDICT_CHUNK):
        chunk = ids[start:start + PREDICT_CHUNK]
        parts.append(estimator.predict(fold_dir, fold, chunk))
        bar.update(len(chunk))
    non_empty = [p for p in parts if len(p)] or parts[:1]
    return pd.concat(non_empty, ignore_index=True).assign(fold=fold)


def _predict_fold(estimator: FoldEstimator, item: tuple) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """One fold model's OOF and pool predictions (in whichever process the executor chose)."""
    k, fold_dir, oof_ids, pool_ids = item
    oof = estimator.predict(fold_dir, k, oof_ids).assign(fold=k) if oof_ids else None
    pool = estimator.predict(fold_dir, k, pool_ids).assign(fold=k) if pool_ids else None
    return oof, pool


def trained_on(fold_dir: Path) -> set[str]:
    """The distinct images a fold model was trained on, as the loop recorded them."""
    path = Path(fold_dir) / TRAIN_IDS
    if not path.is_file():
        raise DataError(f"{path}: missing; the fold model's training images are unknown, so its "
                        "out-of-fold predictions cannot be checked")
    return set(path.read_text().split())


def assert_out_of_fold(assignment: dict[int, list[str]], folds: pd.Series, oof_ids: Sequence[str],
                       seen: dict[int, set[str]], *, where: Path | str) -> None:
    """The out-of-fold contract, checked at run time before any prediction is made: every image of
    ``oof_ids`` is predicted exactly once, by the model of its own fold, which never trained on it."""
    predicted = [i for ids in assignment.values() for i in ids]
    counts = pd.Series(predicted, dtype=object).value_counts()
    if (counts != 1).any() or set(counts.index) != set(oof_ids):
        missing = sorted(set(oof_ids) - set(counts.index))[:3]
        raise DataError(f"{where}: OOF predictions cover labeled images {len(counts)} times/ids; missing {missing}")
    for fold, ids in assignment.items():
        wrong = [i for i in ids if folds[i] != fold]
        if wrong:
            raise DataError(f"{where}: image {wrong[0]} of fold {folds[wrong[0]]} predicted by fold model {fold}")
        leaked = seen[fold] & set(ids)
        if leaked:
            raise DataError(f"{where}: fold model {fold} trained on {len(leaked)} of the images it predicts OOF, "
                            f"e.g. {sorted(leaked)[0]}")
