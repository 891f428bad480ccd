"""The final stage: the last classifier's P(abnormal) gates the last detector; submissions.

VinBigData's lesson: a normal/abnormal classifier in front of the detector, with a "No finding"
prediction where it is confident, is worth more than a better detector. The gate's thresholds are
tuned on OOF predictions (never on the test part) for the best mAP including "No finding".
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...datasets.adapters import training_boxes
from ...datasets.atomic import read_table, write_json, write_table
from .. import gating, pseudo
from ..context import RunContext
from ..layout import BOX_PREDICTIONS, CLASS_PREDICTIONS, GATE, OOF_BOXES, POOL_FUSED, SUBMISSION
from ..tasks.classifier import load_predictions
from ..tasks.detector import DetectorTask, p_abnormal


def final_stage(ctx: RunContext, detector: DetectorTask | None, cls_pred: Path, det_pred: Path | None,
                out_dir: Path) -> dict:
    """Write the class predictions, and with a detector the gated boxes, gate.json and submissions."""
    cfg, table = ctx.cfg, ctx.table
    probs = load_predictions(cls_pred)
    pool_probs = probs.get("pool", probs["oof"].iloc[:0])
    write_table(out_dir / CLASS_PREDICTIONS, pd.concat([probs["oof"].assign(split="oof"),
                                                        pool_probs.assign(split="pool")], ignore_index=True))
    if det_pred is None or detector is None:
        return {}
    gate = tune_or_fixed_gate(ctx, detector, cls_pred, det_pred)
    p_ab = p_abnormal(table, cls_pred)
    oof = read_table(det_pred / OOF_BOXES)
    boxes = pd.concat([oof.drop(columns=["fold"], errors="ignore"), read_table(det_pred / POOL_FUSED)],
                      ignore_index=True)
    gated = pseudo.gate_predictions(boxes[boxes["image_id"].isin(p_ab.index)], p_ab,
                                    no_finding_class=len(table.box_classes), low=gate["low"], high=gate["high"],
                                    mode=cfg.gate.mode)
    write_table(out_dir / BOX_PREDICTIONS.format("raw"), boxes)
    write_table(out_dir / BOX_PREDICTIONS.format("gated"), gated)
    test_ids = [i for i in ctx.scored_test_ids() if i in ctx.box_labeled]
    gt = training_boxes(table)
    scores = {}
    for label, ids in (("oof", detector.labeled_ids()), ("test", test_ids)):
        if ids:
            kw = dict(class_names=list(table.box_classes), iou_thr=cfg.detector.metric_iou)
            scores[label] = {"ungated": gating.gated_map(boxes, p_ab, gt, ids, mode="off", low=0, high=1, **kw)["map"],
                             "gated": gating.gated_map(boxes, p_ab, gt, ids, mode=cfg.gate.mode, low=gate["low"],
                                                       high=gate["high"], **kw)["map"]}
    write_submissions(ctx, boxes, gated, pool_probs, out_dir)
    result = {"mode": cfg.gate.mode, "low": gate["low"], "high": gate["high"], "tuned": gate.get("tuned", False),
              **scores}
    write_json(out_dir / GATE, result)
    return result


def tune_or_fixed_gate(ctx: RunContext, detector: DetectorTask, cls_pred: Path, det_pred: Path) -> dict:
    g = ctx.cfg.gate
    if not g.tune_on_oof or g.mode == "off":
        return {"low": g.low, "high": g.high}
    best = gating.tune_gate(read_table(det_pred / OOF_BOXES), p_abnormal(ctx.table, cls_pred),
                            training_boxes(ctx.table), detector.labeled_ids(),
                            class_names=list(ctx.table.box_classes), iou_thr=ctx.cfg.detector.metric_iou, mode=g.mode)
    return {"low": best.get("low", g.low), "high": best.get("high", g.high), "tuned": True}


def write_submissions(ctx: RunContext, raw: pd.DataFrame, gated: pd.DataFrame, pool_probs: pd.DataFrame,
                      out_dir: Path) -> None:
    """Competition CSVs for the test role (or the unlabeled pool when there is no test role)."""
    items = ctx.table.with_role("test")
    if items.empty:
        items = ctx.table.with_role("unlabeled")
    nf = len(ctx.table.box_classes)
    for tag, boxes in (("raw", raw), ("gated", gated)):
        if ctx.cfg.data.layout == "siim":
            sub = gating.siim_submission(boxes, pool_probs, items, study_classes=ctx.table.study_classes,
                                         normal_class=ctx.table.normal_class, no_finding_class=nf)
        else:
            sub = gating.vinbigdata_submission(boxes, items, no_finding_class=nf)
        write_table(out_dir / SUBMISSION.format(tag), sub)
