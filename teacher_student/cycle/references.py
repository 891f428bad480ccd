"""Reference models that say what a student's score means.

Both are the last student's recipe -- model, noise, folds -- trained in their own folders and
scored like every generation (OOF and the held-out test part):

- the **ablation** trains on the labeled images only, for the student's number of optimizer steps:
  ``student - ablation`` is what the pseudo labels gave, the bigger model and the noise being the
  same on both sides;
- the **oracle** trains on every label (the labeled part plus the pool's hidden truth, runs that
  have it) for a larger step budget (``run.oracle_steps``) with early stopping on its validation
  fold: a ceiling, against which ``gap_closed = (student - teacher) / (oracle - teacher)`` is read.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...datasets.adapters import training_boxes
from ...datasets.grades import GRADE
from ...datasets.table import ItemTable
from ...loops.crossfit import cross_fit
from ..context import RunContext
from ..summary import dig
from .generation import CrossFit

ORACLE, ABLATION = "oracle", "ablation"
GAINS = (("classifier_auc", ("classifier", "test", "auc_macro")), ("detector_map", ("detector", "test", "map")),
         ("segmenter_dice", ("segmenter", "test", "dice")),
         ("grader_qwk", ("grader", "test", "qwk")))
LABEL_FLAG = {"classifier": "has_study_label", "detector": "box_labeled", "segmenter": "mask_labeled"}
"""The item column saying an image holds ground truth for a task kind (the grader's: a known grade)."""


def truth_table(ctx: RunContext) -> ItemTable:
    """The run's table with the hidden truth of the unlabeled pool filled in (references only)."""
    truth_items = ctx.truth.items.set_index("image_id")
    items = ctx.table.items.copy()
    pool = items["role"].eq("unlabeled") & items["image_id"].isin(truth_items.index)
    flags = [f for f in LABEL_FLAG.values() if f in items and f in truth_items]
    cols = [*ctx.table.label_columns, *flags, *(c for c in ("mask_path", "mask_rle") if c in items and c in truth_items)]
    cols += [GRADE] if GRADE in items and GRADE in truth_items else []
    items.loc[pool, cols] = truth_items.loc[items.loc[pool, "image_id"], cols].to_numpy()
    items[flags] = items[flags].astype(bool)
    truth_boxes = training_boxes(ctx.truth)
    boxes = pd.concat([ctx.table.boxes, truth_boxes[truth_boxes["image_id"].isin(set(items.loc[pool, "image_id"]))]],
                      ignore_index=True)
    return ctx.table.replace(items=items, boxes=boxes)


def ablation_fits(ctx: RunContext, tasks: list, gen: int) -> list[CrossFit]:
    """Generation ``gen``'s recipe on the labeled images only (no pseudo labels, no soft targets)."""
    if not ctx.cfg.run.ablation or gen < 1:
        return []
    return [CrossFit(task, gen, ctx.layout.reference(ABLATION, task.name)) for task in tasks]


def oracle_fits(ctx: RunContext, tasks: list, gen: int) -> list[CrossFit]:
    """Generation ``gen``'s recipe on every label, trained towards convergence: the ceiling."""
    if ctx.truth is None or not ctx.cfg.run.oracle:
        return []
    table = truth_table(ctx)
    pool = table.items["role"].eq("unlabeled")
    run = ctx.cfg.run
    fits = []
    for task in tasks:
        known = table.items[LABEL_FLAG[task.name]] if task.name in LABEL_FLAG else table.items[GRADE].notna()
        extra = tuple(table.items.loc[pool & known, "image_id"])
        fits.append(CrossFit(type(task)(ctx, table), gen, ctx.layout.reference(ORACLE, task.name), extra_ids=extra,
                             steps_factor=run.oracle_steps, patience=run.oracle_patience))
    return fits


def reference_record(fits: list[CrossFit], preds: dict[str, Path], gen: int, **recipe) -> dict | None:
    """A reference's scores (OOF, test), per task, from its trained cross-fits."""
    if not fits:
        return None
    out: dict = {"generation": gen, **recipe}
    for fit in fits:
        out[fit.task.name] = fit.task.score(preds[fit.task.name])
        out[f"{fit.task.name}_model"] = fit.task.model_name(gen)
    return out


def references(ctx: RunContext, tasks: list, gen: int) -> tuple[dict | None, dict | None]:
    """Train (or reuse) the ablation and the oracle -- all their folds side by side when the
    executor can -- and score them."""
    abl, orc = ablation_fits(ctx, tasks, gen), oracle_fits(ctx, tasks, gen)
    jobs = [fit.job(ctx) for fit in abl + orc]
    preds = cross_fit(*jobs, runner=ctx)
    abl_preds = {fit.task.name: p for fit, p in zip(abl, preds[:len(abl)])}
    orc_preds = {fit.task.name: p for fit, p in zip(orc, preds[len(abl):])}
    run = ctx.cfg.run
    return (reference_record(abl, abl_preds, gen),
            reference_record(orc, orc_preds, gen, steps_factor=run.oracle_steps, patience=run.oracle_patience))


def gains(gens: list[dict], ablation_rec: dict | None, oracle_rec: dict | None) -> dict:
    """Per metric (held-out test): teacher, student, ablation, oracle, ``student - ablation``,
    ``student - teacher`` and ``gap_closed``, which is "undefined" (with the reason) whenever the
    oracle does not beat the teacher -- a ratio over a non-positive gap means nothing."""
    if len(gens) < 2:
        return {}
    out = {}
    for key, path in GAINS:
        teacher, student = dig(gens[0], *path), dig(gens[-1], *path)
        if teacher is None or student is None:
            continue
        abl, orc = dig(ablation_rec, *path), dig(oracle_rec, *path)
        rec = {"teacher": teacher, "student": student, "ablation": abl, "oracle": orc,
               "student_minus_teacher": student - teacher,
               "student_minus_ablation": None if abl is None else student - abl}
        if orc is None:
            rec["gap_closed"] = "undefined: no oracle (the pool has no hidden truth, or run.oracle is off)"
        elif orc - teacher <= 1e-9:
            rec["gap_closed"] = (f"undefined: the oracle ({orc:.3f}) does not beat the teacher ({teacher:.3f}), "
                                 "so there is no gap to close")
        else:
            rec["gap_closed"] = (student - teacher) / (orc - teacher)
        out[key] = rec
    return out
