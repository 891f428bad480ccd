"""The linear-time mAP and gate grid give the numbers of the plain per-image, per-grid-point recipe.

bench/bench_scale.py found the gate grid (56 full mAP evaluations with a pandas sort per image
and class) taking minutes on a few hundred VinBigData images; the metric now matches boxes once
and re-ranks arrays. These tests hold it to the plain recipe on random tables full of score ties
(ties are where an ordering detail changes an AP), exactly.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from cxr_noisy_student.datasets.boxes import BOX_COLUMNS
from cxr_noisy_student.loops.det_metrics import average_precision, greedy_match, mean_average_precision
from cxr_noisy_student.teacher_student import gating


def reference_map(preds: pd.DataFrame, gts: pd.DataFrame, num_classes: int, iou_thr: float) -> dict:
    """The plain recipe: per class, per image (first appearance), predictions by score (stable),
    greedy matching, then one stable ranking by score over all of them."""
    out = {}
    for c in range(num_classes):
        p, g = preds[preds["class_id"] == c], gts[gts["class_id"] == c]
        if not len(g):
            out[c] = None
            continue
        gt_by_image = {k: v[BOX_COLUMNS].to_numpy() for k, v in g.groupby("image_id", sort=False)}
        scores, hits = [], []
        for image_id, q in p.groupby("image_id", sort=False):
            q = q.sort_values("score", ascending=False, kind="mergesort")
            scores.append(q["score"].to_numpy(np.float64))
            hits.append(greedy_match(q[BOX_COLUMNS].to_numpy(), gt_by_image.get(image_id, np.zeros((0, 4))),
                                     iou_thr=iou_thr))
        if not scores:
            out[c] = 0.0
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")
        tp = np.concatenate(hits)[order]
        out[c] = average_precision(recall=np.cumsum(tp) / len(g), precision=np.cumsum(tp) / np.arange(1, len(tp) + 1))
    return out


def random_boxes(rng, ids, n, n_cls, *, score: bool) -> pd.DataFrame:
    c, h = rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.2, (n, 2))
    df = pd.DataFrame({"image_id": [ids[i] for i in rng.integers(len(ids), size=n)], "class_id": rng.integers(n_cls, size=n),
                       "x_min": c[:, 0] - h[:, 0], "y_min": c[:, 1] - h[:, 1],
                       "x_max": c[:, 0] + h[:, 0], "y_max": c[:, 1] + h[:, 1]})
    if score:
        df["score"] = np.round(rng.uniform(0, 1, n), 1)  # many ties
    return df


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    n_cls = int(rng.integers(1, 4))
    ids = [f"im{i:02d}" for i in range(int(rng.integers(2, 25)))]
    gt = random_boxes(rng, ids, int(rng.integers(0, 30)), n_cls, score=False).astype({c: "float32" for c in BOX_COLUMNS})
    pred = pd.concat([random_boxes(rng, ids, int(rng.integers(0, 60)), n_cls, score=True),
                      gt.assign(score=np.round(rng.uniform(0, 1, len(gt)), 1))], ignore_index=True)
    pred = pred.sample(frac=1, random_state=seed).reset_index(drop=True).astype({c: np.float64 for c in BOX_COLUMNS})
    return rng, ids, n_cls, gt, pred


@pytest.mark.parametrize("seed", range(12))
def test_map_equals_the_per_image_recipe(seed):
    _, _, n_cls, gt, pred = random_case(seed)
    fast = mean_average_precision(pred, gt, num_classes=n_cls, iou_thr=0.4)
    assert list(fast["per_class"].values()) == list(reference_map(pred, gt, n_cls, 0.4).values())


@pytest.mark.parametrize("seed", range(8))
def test_the_gate_grid_equals_gated_map_at_every_point(seed):
    rng, ids, n_cls, gt, pred = random_case(100 + seed)
    p = pd.Series(np.round(rng.uniform(0, 1, len(ids)), 2), index=ids)  # ties with the grid's thresholds too
    scored = [i for i in ids if rng.uniform() < 0.8] or ids[:1]
    names = [f"c{c}" for c in range(n_cls)]
    grid = gating.HardGateGrid(pred, p, gt, scored, class_names=names, iou_thr=0.4)
    for low, high in itertools.product(gating.LOW_GRID, gating.HIGH_GRID):
        if low <= high:
            slow = gating.gated_map(pred, p, gt, scored, class_names=names, iou_thr=0.4, mode="hard", low=low, high=high)
            assert grid.map(low, high) == slow["map"], (low, high)


def test_tune_gate_hand_case():
    """Two images: one abnormal with a found box, one normal with a false box at P(abnormal) 0.1.
    Dropping the normal image's box (low > 0.1) and saying "No finding" there is perfect."""
    gt = pd.DataFrame({"image_id": ["a"], "class_id": [0], "x_min": [0.1], "y_min": [0.1], "x_max": [0.4], "y_max": [0.4]})
    pred = pd.DataFrame({"image_id": ["a", "b"], "class_id": [0, 0], "x_min": [0.1, 0.5], "y_min": [0.1, 0.5],
                         "x_max": [0.4, 0.8], "y_max": [0.4, 0.8], "score": [0.6, 0.9]})
    p = pd.Series([0.9, 0.1], index=["a", "b"])
    best = gating.tune_gate(pred, p, gt, ["a", "b"], class_names=["lesion"], iou_thr=0.4, mode="hard")
    assert best == {"map": 1.0, "low": 0.15, "high": 0.5}
