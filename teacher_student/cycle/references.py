"""Reference models that say what a student's score means (runs whose pool has hidden truth).

The oracle is the cycle-0 recipe trained on every label -- the labeled part plus the pool's hidden
truth -- so "gap closed" can be read against it. It trains in its own folders (``oracle/<task>``)
and is scored on the same held-out test part as every generation.
"""
from __future__ import annotations

import pandas as pd

from ...datasets.adapters import training_boxes
from ...datasets.table import ItemTable
from ..context import RunContext
from ..summary import dig
from ..tasks.classifier import ClassifierTask
from ..tasks.detector import DetectorTask
from .generation import train_generation

ORACLE = "oracle"


def truth_table(ctx: RunContext) -> ItemTable:
    """The run's table with the hidden truth of the unlabeled pool filled in (references only)."""
    truth_items = ctx.truth.items.set_index("image_id")
    items = ctx.table.items.copy()
    pool = items["role"].eq("unlabeled") & items["image_id"].isin(truth_items.index)
    cols = [*ctx.table.label_columns, "has_study_label", "box_labeled"]
    items.loc[pool, cols] = truth_items.loc[items.loc[pool, "image_id"], cols].to_numpy()
    items[["has_study_label", "box_labeled"]] = items[["has_study_label", "box_labeled"]].astype(bool)
    truth_boxes = training_boxes(ctx.truth)
    boxes = pd.concat([ctx.table.boxes, truth_boxes[truth_boxes["image_id"].isin(set(items.loc[pool, "image_id"]))]],
                      ignore_index=True)
    return ctx.table.replace(items=items, boxes=boxes)


def oracle(ctx: RunContext, with_detector: bool) -> dict | None:
    """The cycle-0 recipe trained on every label: the ceiling "gap closed" is read against."""
    if ctx.truth is None or not ctx.cfg.run.oracle:
        return None
    table = truth_table(ctx)
    pool = table.items["role"].eq("unlabeled")
    classifier = ClassifierTask(ctx, table)
    extra = tuple(table.items.loc[pool & table.items["has_study_label"], "image_id"])
    pred = train_generation(ctx, classifier, 0, None, None, task_dir=ctx.layout.reference(ORACLE, classifier.name),
                            extra_ids=extra)
    out = {"model": ctx.cfg.classifier.ladder[0], "classifier": classifier.score(pred)}
    if with_detector:
        detector = DetectorTask(ctx, table)
        boxed = tuple(table.items.loc[pool & table.items["box_labeled"], "image_id"])
        pred = train_generation(ctx, detector, 0, None, None, task_dir=ctx.layout.reference(ORACLE, detector.name),
                                extra_ids=boxed)
        out["detector"] = detector.score(pred)
    return out


def gap_closed(gens: list[dict], oracle_rec: dict | None) -> dict:
    """(last student - teacher) / (oracle - teacher) on the held-out test part."""
    if not oracle_rec or len(gens) < 2:
        return {}
    out = {}
    for key, path in (("classifier_auc", ("classifier", "test", "auc_macro")), ("detector_map", ("detector", "test", "map"))):
        vals = [dig(gens[0], *path), dig(gens[-1], *path), dig(oracle_rec, *path)]
        if None not in vals and abs(vals[2] - vals[0]) > 1e-9:
            out[key] = (vals[1] - vals[0]) / (vals[2] - vals[0])
    return out
