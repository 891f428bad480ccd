"""A generation of one task: its k fold models and their OOF + pool predictions.

Generation 0 is the cycle-0 teacher (labeled data only); generation g is the student of cycle g,
trained on the pseudo labels generation g - 1 made. The work is the one cross-fit loop
(``loops.crossfit``), which also checks the out-of-fold contract, whatever the task.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...loops.crossfit import cross_fit
from ..context import RunContext
from ..tasks.base import Task


def train_generation(ctx: RunContext, task: Task, gen: int, pseudo_dir: Path | None, teacher: Path | None, *,
                     task_dir: Path | None = None, extra_ids: Sequence[str] = (), steps_factor: float | None = None,
                     patience: int = 0) -> Path:
    """Train (or reuse) generation ``gen`` of ``task`` and predict; return its predictions dir.

    Args:
        pseudo_dir: the cycle's pseudo labels (None for generation 0).
        teacher: the previous generation's predictions of this task (its OOF soft labels).
        task_dir: where the fold models go (default: the generation's folder); references use their own.
        extra_ids: images added to every fold's training set (the oracle adds the pool's truth).
        steps_factor: optimizer steps as a multiple of the teacher's (the oracle's larger budget).
        patience: early stopping on the fold's validation images (0: the recipe's own setting).
    """
    plans = task.fold_plans(gen, pseudo_dir, teacher, extra_ids, steps_factor=steps_factor, patience=patience)
    task_dir = task_dir or ctx.layout.task(gen, task.name)
    pred = cross_fit(task, plans, folds=ctx.folds, oof_ids=task.labeled_ids(), pool_ids=task.every_fold_ids(),
                     task_dir=task_dir, run_stage=ctx.stage, payload=task.payload(gen))
    if ctx.cfg.run.tensorboard:
        backfill_tensorboard(ctx, [task_dir / f"fold{plan.fold}" for plan in plans])
    return pred


def backfill_tensorboard(ctx: RunContext, fold_dirs: list[Path]) -> None:
    """TensorBoard scalars for fold models trained before (a resumed run, or run.tensorboard turned
    on later): written from their history.json; folds trained now wrote theirs live."""
    from ...datasets.atomic import read_json
    from ...loops.tensorboard import has_events, write_history
    from ..layout import HISTORY

    for fold_dir in fold_dirs:
        logdir = ctx.layout.tensorboard_of(fold_dir)
        if (fold_dir / HISTORY).exists() and not has_events(logdir):
            write_history(logdir, [r for r in read_json(fold_dir / HISTORY).get("history", []) if not r.get("final")])
