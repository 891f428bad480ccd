"""A generation of one task: its k fold models and their OOF + pool predictions.

Generation 0 is the cycle-0 teacher (labeled data only); generation g is the student of cycle g,
trained on the pseudo labels generation g - 1 made. The work is the one cross-fit loop
(``loops.crossfit``), which also checks the out-of-fold contract, whatever the task. A
:class:`CrossFit` says which cross-fit is meant (a generation, the ablation, the oracle); the
runner and the stage graph (``cycle.graph``) both build their stages from it, so a stage run on
its own (``run_cycle.py run --only``) has exactly the fingerprint the whole run gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ...loops.crossfit import CrossFitJob, cross_fit
from ..context import RunContext
from ..tasks.base import Task


@dataclass(frozen=True, eq=False)
class CrossFit:
    """One cross-fit of one task, described by where its inputs are.

    Args:
        pseudo_dir: the cycle's pseudo labels (None for generation 0 and the references).
        teacher: the previous generation's predictions of this task (its OOF soft labels).
        task_dir: where the fold models go (a generation's folder; references use their own).
        extra_ids: images added to every fold's training set (the oracle adds the pool's truth).
        steps_factor: optimizer steps as a multiple of the teacher's (the oracle's larger budget);
            None: the task's own rule (1 for the teacher, its student_steps for students).
        patience: early stopping on the fold's validation images (0: the recipe's own setting).
    """

    task: Task
    gen: int
    task_dir: Path
    pseudo_dir: Path | None = None
    teacher: Path | None = None
    extra_ids: tuple[str, ...] = ()
    steps_factor: float | None = None
    patience: int = 0

    def job(self, ctx: RunContext) -> CrossFitJob:
        """The loop's job: fold plans read from the inputs (which must exist)."""
        plans = self.task.fold_plans(self.gen, self.pseudo_dir, self.teacher, self.extra_ids,
                                     steps_factor=self.steps_factor, patience=self.patience)
        return CrossFitJob(self.task, plans, folds=ctx.folds, oof_ids=self.task.labeled_ids(),
                           pool_ids=self.task.every_fold_ids(), task_dir=self.task_dir, payload=self.task.payload(self.gen))

    @property
    def predictions(self) -> Path:
        return self.task_dir / "predictions"


def generation_fit(ctx: RunContext, task: Task, gen: int) -> CrossFit:
    """Generation ``gen`` of ``task``: the teacher (0), or the student of cycle ``gen``."""
    if gen == 0:
        return CrossFit(task, 0, ctx.layout.task(0, task.name))
    return CrossFit(task, gen, ctx.layout.task(gen, task.name), pseudo_dir=ctx.layout.pseudo(gen),
                    teacher=ctx.layout.predictions(gen - 1, task.name))


def train_fits(ctx: RunContext, fits: Sequence[CrossFit]) -> dict[str, Path]:
    """Train (or reuse) several cross-fits -- their folds side by side when the executor can --
    and predict; return each task's predictions dir."""
    jobs = [fit.job(ctx) for fit in fits]
    preds = cross_fit(*jobs, runner=ctx)
    if ctx.cfg.run.tensorboard:
        backfill_tensorboard(ctx, [Path(job.task_dir) / f"fold{plan.fold}" for job in jobs for plan in job.plans])
    return {fit.task.name: pred for fit, pred in zip(fits, preds)}


def train_generation(ctx: RunContext, task: Task, gen: int, pseudo_dir: Path | None, teacher: Path | None, *,
                     task_dir: Path | None = None, extra_ids: Sequence[str] = (), steps_factor: float | None = None,
                     patience: int = 0) -> Path:
    """Train (or reuse) generation ``gen`` of ``task`` and predict; return its predictions dir
    (arguments as :class:`CrossFit`)."""
    fit = CrossFit(task, gen, task_dir or ctx.layout.task(gen, task.name), pseudo_dir, teacher, tuple(extra_ids),
                   steps_factor, patience)
    return train_fits(ctx, [fit])[task.name]


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
