"""The pseudo-label stage of a cycle: each task chooses its pseudo labels from the teachers'
predictions (thresholds from OOF against ground truth; the pool's hidden truth only measures)."""
from __future__ import annotations

from pathlib import Path

from ...datasets.config import config_to_dict
from ...loops.crossfit import StageSpec
from ...loops.stages import file_digest
from ..context import RunContext
from ..layout import CLASSIFIER, DETECTOR, GRADER, SEGMENTER
from ..tasks.base import Task


def select_stage(ctx: RunContext, tasks: list[Task], teachers: dict[str, Path], cycle: int) -> dict:
    """Run (or reuse) ``cycle<c>/pseudo``; return its record (``result``: per task, its selection info)."""
    return ctx.stage(*select_spec(ctx, tasks, teachers, cycle))


def mask_selection_settings(sc) -> dict:
    """The segmenter settings that choose pseudo masks (not how students read or weigh them)."""
    keys = ("pixel_threshold", "confidence", "target_dice", "min_oof_support", "fallback_k", "hflip")
    return {k: getattr(sc, k) for k in keys}


def box_selection_settings(dc) -> dict:
    """The detector section less what only shapes students' training (the fine-tuning phase):
    choosing pseudo boxes does not depend on it."""
    return {k: v for k, v in config_to_dict(dc).items() if k not in ("finetune", "finetune_lr")}


def select_spec(ctx: RunContext, tasks: list[Task], teachers: dict[str, Path], cycle: int) -> StageSpec:
    """The pseudo-label stage of ``cycle`` from the teachers' predictions (which must exist: digested)."""
    cfg = ctx.cfg
    payload = {"teacher": file_digest(teachers[CLASSIFIER]) if CLASSIFIER in teachers else None,
               "detector": file_digest(teachers[DETECTOR]) if DETECTOR in teachers else None,
               "pseudo": config_to_dict(cfg.pseudo), "det": box_selection_settings(cfg.detector), "seed": cfg.run.seed}
    if SEGMENTER in teachers:  # keyed only when present, so runs without masks keep their fingerprints
        payload["segmenter"] = [file_digest(teachers[SEGMENTER]), mask_selection_settings(cfg.segmenter)]
    if GRADER in teachers:  # only then, so runs without a grader keep their fingerprints
        payload[GRADER] = {"teacher": file_digest(teachers[GRADER]), "config": config_to_dict(cfg.grader)}

    def select(out_dir: Path) -> dict:
        return {task.name: task.select(teachers, out_dir, cycle) for task in tasks}

    return ctx.layout.pseudo(cycle), payload, select
