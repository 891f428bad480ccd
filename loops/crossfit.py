"""The one cross-fit loop: k fold models, out-of-fold predictions, pool predictions.

Modelled on scikit-learn's ``cross_val_predict``: each labeled image is predicted exactly once, by
the fold model that was fitted without it, and the loop -- not each model kind -- checks that
contract, so every task kind (classifier, detector, ...) gets the same guarantee from one place.
Every fold model also predicts the pool (images that are not out-of-fold), which is what a fold
ensemble and its pseudo labels are made of.

The loop knows nothing of what is trained: an estimator (see :class:`FoldEstimator`) fits one
fold from a :class:`FoldPlan`, predicts images with one fold model, and turns the per-fold
prediction tables into its output files. Each fold and the prediction step are resumable stages
run through the caller's ``run_stage``, keyed by the plan's fingerprint payload.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pandas as pd

from ..datasets.errors import DataError
from ..datasets.progress import Progress
from .stages import file_digest

PREDICT_CHUNK = 256
"""Images per predict call (see _predict_in_chunks)."""
TRAIN_IDS = "train_ids.txt"
"""Written into every fold directory by the loop: the fold model's distinct training images."""

StageRunner = Callable[[Path, dict, Callable[[Path], Any]], dict]
"""``run_stage(stage_dir, payload, fn) -> record``: run ``fn(tmp_dir)`` unless done (loops.stages)."""


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


def cross_fit(estimator: FoldEstimator, plans: Sequence[FoldPlan], *, folds: pd.Series, oof_ids: Sequence[str],
              pool_ids: Sequence[str], task_dir: Path, run_stage: StageRunner, payload: dict) -> Path:
    """Fit every fold (one stage each), then predict OOF + pool (one stage); return the predictions dir.

    Args:
        folds: fold of every labeled image (index image_id).
        oof_ids: the images to predict out of fold (each by the model of its own fold).
        pool_ids: the images every fold model predicts.
        payload: the config slice shared by every stage of this cross-fit (model, noise, seed...).
    """
    task_dir = Path(task_dir)
    for plan in plans:
        fold_payload = {**payload, "fold": plan.fold, **plan.payload, "val": list(plan.val_ids), "epochs": plan.epochs,
                        "patience": plan.patience}
        run_stage(task_dir / f"fold{plan.fold}", fold_payload, lambda d, p=plan: _fit(estimator, p, d))
    fold_dirs = {plan.fold: task_dir / f"fold{plan.fold}" for plan in plans}
    pred_payload = {**payload, "models": file_digest(*fold_dirs.values()), "pool": list(pool_ids)}
    pred_dir = task_dir / "predictions"
    run_stage(pred_dir, pred_payload, lambda d: _predict(estimator, fold_dirs, folds, oof_ids, pool_ids, d))
    return pred_dir


def _fit(estimator: FoldEstimator, plan: FoldPlan, out_dir: Path) -> dict:
    (out_dir / TRAIN_IDS).write_text("\n".join(sorted(set(plan.train_ids))) + "\n")
    return estimator.fit_fold(plan, out_dir)


def _predict(estimator: FoldEstimator, fold_dirs: dict[int, Path], folds: pd.Series, oof_ids: Sequence[str],
             pool_ids: Sequence[str], out_dir: Path) -> dict:
    assignment = {k: [i for i in oof_ids if folds[i] == k] for k in fold_dirs}
    assert_out_of_fold(assignment, folds, oof_ids, {k: trained_on(d) for k, d in fold_dirs.items()},
                       where=out_dir.parent.parent / out_dir.parent.name)
    oof_parts, pool_parts = [], []
    total = len(oof_ids) + len(fold_dirs) * len(pool_ids)
    where = f"{out_dir.parent.parent.name}/{out_dir.parent.name}/predictions"
    with Progress(total, where, "img") as bar:
        for k, fold_dir in fold_dirs.items():
            if assignment[k]:
                oof_parts.append(_predict_in_chunks(estimator, fold_dir, k, assignment[k], bar))
            if pool_ids:
                pool_parts.append(_predict_in_chunks(estimator, fold_dir, k, list(pool_ids), bar))
    oof = pd.concat(oof_parts, ignore_index=True) if oof_parts else pd.DataFrame(columns=["image_id", "fold"])
    pool = pd.concat(pool_parts, ignore_index=True) if pool_parts else pd.DataFrame(columns=["image_id", "fold"])
    return estimator.write_predictions(oof, pool, out_dir)


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
