"""Tests of the per-cycle pseudo-label quality report (teacher_student.report).

The fixture is a small synthetic run written in exactly the layout ``loops.cycle`` writes
(``make_synthetic_run``): real chest radiographs from ../shared/data as images (through a real
preprocessing cache), teacher predictions simulated with a known amount of noise, and pseudo labels
selected by the engine's own pure functions (``teacher_student.pseudo``).

Why the report is checked by decoding its embedded PNGs with PIL rather than by rendering it in a
browser: the PNG check is deterministic (no fonts, no GPU, no browser version), needs nothing CI
lacks (headless Chromium is not installed there), runs in milliseconds, and tests what can actually
go wrong with an embedded figure (a truncated or mis-encoded data URI, an empty canvas, a figure
of absurd size). Where ``chromium`` is on the PATH, two tests also screenshot the page with headless
Chromium: it opens offline, and the headline's red flags are on the first screen (1280 x 800); they
are skipped elsewhere.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr_noisy_student.datasets.boxes import BOX_COLUMNS
from cxr_noisy_student.datasets.table import ItemTable, label_column, save_table
from cxr_noisy_student.datasets.errors import DataError
from cxr_noisy_student.datasets.atomic import write_json, write_table
from cxr_noisy_student.teacher_student import pseudo
from cxr_noisy_student.teacher_student.config import EngineConfig, load_config
from cxr_noisy_student.datasets.config import config_to_dict
from cxr_noisy_student.loops.det_metrics import true_positive_mask
from cxr_noisy_student.teacher_student.report import write_cycle_report, write_index
from cxr_noisy_student.teacher_student.report.stats import (expected_calibration_error, label_issues, reliability_table,
                                                            verdict)

VERDICTS = {"trust", "review", "do not use", "none kept"}


# ============================================================================ synthetic run


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _probs(y: np.ndarray, strength: float, noise: np.ndarray, mode: str) -> np.ndarray:
    """Teacher probabilities: the truth as a logit of ``strength`` plus noise (better with strength)."""
    if mode == "multiclass":
        return _softmax(3.0 * strength * y + noise)
    return 1 / (1 + np.exp(-(2.5 * strength * (2 * y - 1) + noise)))


def _truth(rng, n: int, n_classes: int, mode: str) -> np.ndarray:
    if mode == "multiclass":
        return np.eye(n_classes)[rng.choice(n_classes, size=n, p=np.r_[0.35, np.full(n_classes - 1, 0.65 / (n_classes - 1))])]
    y = (rng.random((n, n_classes)) < 0.4).astype(float)
    return y


def _boxes_for(rng, image_id: str, abnormal: bool, n_box: int) -> list[dict]:
    """Ground-truth boxes of an image: class k sits in its own region, slightly jittered."""
    if not abnormal:
        return []
    rows = []
    for k in rng.choice(n_box, size=min(n_box, rng.integers(1, 3)), replace=False):
        cx, cy = 0.25 + 0.5 * (k % 2) + rng.normal(0, 0.03), 0.3 + 0.4 * ((k // 2) % 2) + rng.normal(0, 0.03)
        w, h = rng.uniform(0.15, 0.3), rng.uniform(0.2, 0.35)
        rows.append({"image_id": image_id, "class_id": int(k), "x_min": max(cx - w / 2, 0.0), "y_min": max(cy - h / 2, 0.0),
                     "x_max": min(cx + w / 2, 1.0), "y_max": min(cy + h / 2, 1.0), "source": "gt", "score": 1.0})
    return rows


def _jitter(rng, box: dict, scale: float) -> dict:
    x0, y0, x1, y1 = (box[c] + rng.normal(0, scale) for c in BOX_COLUMNS)
    x0, y0 = float(np.clip(x0, 0, 0.9)), float(np.clip(y0, 0, 0.9))
    return {**box, "x_min": x0, "y_min": y0, "x_max": float(np.clip(max(x1, x0 + 0.05), 0, 1)),
            "y_max": float(np.clip(max(y1, y0 + 0.05), 0, 1))}


def _items(rng, ids, roles, patients, paths, sizes, y, box_labeled, classes) -> pd.DataFrame:
    items = pd.DataFrame({"image_id": ids, "patient_id": patients, "path": paths, "role": roles,
                          "has_study_label": [r != "unlabeled" for r in roles], "box_labeled": box_labeled,
                          "width": [s[0] for s in sizes], "height": [s[1] for s in sizes]})
    for c, name in enumerate(classes):
        items[label_column(name)] = np.where(items["has_study_label"], y[:, c], np.nan)
    return items


def _table(items, boxes, classes, box_classes, mode, quarantine=None) -> ItemTable:
    frame = pd.DataFrame(boxes, columns=["image_id", "class_id", *BOX_COLUMNS, "source", "score"])
    frame[BOX_COLUMNS] = frame[BOX_COLUMNS].astype("float32")
    kw = {"quarantine": quarantine} if quarantine is not None else {}
    return ItemTable(items=items, boxes=frame, study_classes=tuple(classes), box_classes=tuple(box_classes),
                     label_mode=mode, normal_class=classes[0] if mode == "multiclass" else None, **kw).validate()


def _images(image_paths, ids, size, rng) -> tuple[list[str], list[tuple[int, int]], dict | None]:
    """Source paths and sizes; without real files, in-memory synthetic radiograph-like arrays."""
    if image_paths:
        chosen = [image_paths[i % len(image_paths)] for i in range(len(ids))]
        sizes = [Image.open(p).size for p in chosen]
        return [str(p) for p in chosen], sizes, None
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 120 + 80 * np.sin(3 * xx) * np.cos(2 * yy)
    arrays = {i: np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8) for i in ids}
    return [f"/nonexistent/{i}.png" for i in ids], [(1024, 1024)] * len(ids), arrays


def _classifier_preds(rng, g, ids, y_true, folds, pool_ids, mode, k, classes) -> dict:
    cols = [f"p:{c}" for c in classes]
    idx = {i: n for n, i in enumerate(ids)}
    strength = 0.55 + 0.15 * g
    base_noise = rng.normal(0, 1.0, y_true.shape)
    oof_ids = list(folds.index)
    oof = pd.DataFrame(_probs(y_true[[idx[i] for i in oof_ids]], strength, base_noise[[idx[i] for i in oof_ids]], mode),
                       columns=cols).assign(image_id=oof_ids, fold=folds.to_numpy())[["image_id", "fold", *cols]]
    parts = []
    for f in range(k):
        rows = [idx[i] for i in pool_ids]
        p = _probs(y_true[rows], strength, base_noise[rows] + rng.normal(0, 0.6, (len(rows), len(classes))), mode)
        parts.append(pd.DataFrame(p, columns=cols).assign(image_id=pool_ids, fold=f))
    per_fold = pd.concat(parts, ignore_index=True)[["image_id", "fold", *cols]]
    return {"oof": oof, "pool_folds": per_fold,
            "pool": per_fold.groupby("image_id", sort=True)[cols].mean().reset_index()}


def _detector_preds(rng, g, truth_boxes, det_labeled, folds, pool_ids, k, n_box) -> dict:
    models = [f"f{f}/{v}" for f in range(k) for v in ("orig", "hflip")]

    def predict(image_ids):
        rows = []
        for image_id in image_ids:
            for box in truth_boxes.get(image_id, []):
                if rng.random() < 0.85:
                    rows.append({**_jitter(rng, box, 0.02), "score": float(np.clip(rng.uniform(0.45, 0.95) + 0.03 * g, 0, 1))})
            if rng.random() < 0.6:
                fp = _boxes_for(rng, image_id, True, n_box)[0]
                rows.append({**_jitter(rng, fp, 0.1), "score": float(rng.uniform(0.02, 0.6))})
        df = pd.DataFrame(rows, columns=["image_id", "class_id", *BOX_COLUMNS, "score"])
        n = np.clip((df["score"].to_numpy() * len(models) + rng.integers(-1, 2, len(df))).astype(int), 1, len(models))
        return df.assign(n_models=n, models=[";".join(sorted(rng.choice(models, size=m, replace=False))) for m in n])

    oof = predict(det_labeled).assign(fold=lambda x: x["image_id"].map(folds).astype(int))
    fused = predict(pool_ids)
    raw = fused.loc[fused.index.repeat(fused["n_models"])].assign(
        model=[m for ms in fused["models"] for m in ms.split(";")]).drop(columns=["n_models", "models"])
    return {"oof_boxes": oof, "pool_fused": fused, "pool_raw": raw}


def _mark_true_positives(pred: pd.DataFrame, gt: pd.DataFrame, iou_thr: float) -> pd.DataFrame:
    """teacher_student.detection.mark_true_positives (same rule; that module pulls the detector libraries)."""
    return pred.assign(true_positive=true_positive_mask(pred, gt, iou_thr=iou_thr))


def _select(run, cfg, table, truth, c, cls_preds, det_preds, unlabeled, det_pool, seed) -> dict:
    """Cycle c's pseudo stage, with the engine's pure selection functions, written like loops.cycle."""
    out = run / f"cycle{c}" / "pseudo"
    cols = [f"p:{n}" for n in table.study_classes]
    oof, pool = cls_preds["oof"], cls_preds["pool"]
    thr = (pseudo.class_thresholds(oof[cols].to_numpy(), table.study_targets(oof["image_id"]),
                                   target_precision=cfg.pseudo.target_precision, mode=table.label_mode)
           if cfg.pseudo.target_precision > 0 else None)
    unl = pool[pool["image_id"].isin(unlabeled)]
    sel = pseudo.select_pseudo(unl["image_id"].tolist(), unl[cols].to_numpy(), mode=table.label_mode,
                               class_names=list(table.study_classes), confidence=cfg.pseudo.confidence, thresholds=thr)
    bal = pseudo.balance_classes(sel, per_class=0, seed=seed)
    prov = {"cycle": c, "source": f"gen{c - 1}/classifier", "folds": "|".join(map(str, range(cfg.folds.k)))}
    write_table(out / "class_selection.csv", sel.assign(**prov))
    write_table(out / "class_pseudo.csv", bal.assign(**prov))
    kept = sel[sel["kept"]]
    y = truth.study_targets(kept["image_id"])
    right = (y.argmax(1) == kept["class_index"].to_numpy()) if table.label_mode == "multiclass" else None
    info = {"unlabeled": len(sel), "kept": int(sel["kept"].sum()), "after_balance": int(bal["copies"].sum()) if len(bal) else 0,
            "kept_per_class": kept["label"].value_counts().to_dict(),
            "thresholds": None if thr is None else dict(zip(table.study_classes, thr.tolist())),
            "precision": float(right.mean()) if right is not None and len(right) else None}
    write_json(out / "class_pseudo.json", info)
    rec = {"classifier": info}
    if det_preds is not None:
        rec["detector"] = _select_boxes(out, cfg, table, truth, c, cls_preds, det_preds, det_pool)
    return rec


def _select_boxes(out, cfg, table, truth, c, cls_preds, det_preds, det_pool) -> dict:
    gt = table.boxes
    matched = _mark_true_positives(det_preds["oof_boxes"], gt, cfg.detector.metric_iou)
    thr = pseudo.box_thresholds(matched, num_classes=len(table.box_classes), target_precision=cfg.detector.target_precision)
    cols = [f"p:{n}" for n in table.study_classes]
    probs = pd.concat([cls_preds["oof"], cls_preds["pool"]], ignore_index=True)
    p_ab = pd.Series(probs[cols[1:]].max(axis=1).to_numpy() if table.label_mode == "multilabel"
                     else 1 - probs[cols[0]].to_numpy(), index=probs["image_id"])
    fused = det_preds["pool_fused"][det_preds["pool_fused"]["image_id"].isin(det_pool)]
    boxes, images = pseudo.select_pseudo_boxes(fused, det_pool, p_ab, thresholds=thr,
                                               negative_max_p_abnormal=cfg.detector.negative_max_p_abnormal)
    write_table(out / "box_oof_matched.csv", matched)
    write_table(out / "box_pseudo.csv", boxes.assign(cycle=c, source=f"gen{c - 1}/detector"))
    write_table(out / "box_images.csv", images)
    known = _mark_true_positives(boxes, truth.boxes, cfg.detector.metric_iou) if len(boxes) else boxes.assign(true_positive=[])
    info = {"thresholds": dict(zip(table.box_classes, [None if np.isinf(t) else float(t) for t in thr])),
            "boxes": int(len(boxes)), "images": images["status"].value_counts().to_dict(),
            "precision": float(known["true_positive"].mean()) if len(known) else None, "negative_precision": None}
    write_json(out / "box_pseudo.json", info)
    return info


def _final(run, table, cls_preds, det_preds):
    from cxr_noisy_student.teacher_student.gating import vinbigdata_submission

    out = run / "final"
    pool = cls_preds["pool"]
    write_table(out / "class_predictions.csv", pd.concat([cls_preds["oof"].assign(split="oof"), pool.assign(split="pool")]))
    if det_preds is None:
        return None
    raw = det_preds["pool_fused"]
    p_ab = pd.Series(1 - pool.iloc[:, 1].to_numpy(), index=pool["image_id"])
    gated = pseudo.gate_predictions(raw[raw["image_id"].isin(p_ab.index)], p_ab, no_finding_class=len(table.box_classes),
                                    low=0.08, high=0.95)
    write_table(out / "box_predictions_raw.csv", raw)
    write_table(out / "box_predictions_gated.csv", gated)
    items = table.with_role("test")
    for tag, boxes in (("raw", raw), ("gated", gated)):
        write_table(out / f"submission_{tag}.csv",
                    vinbigdata_submission(boxes, items, no_finding_class=len(table.box_classes)))
    gate = {"mode": "hard", "low": 0.08, "high": 0.95, "tuned": False}
    write_json(out / "gate.json", gate)
    return gate


def _summary(table, gens, cycles, gate) -> dict:
    from cxr_noisy_student.loops.metrics import classification_metrics

    records = []
    for g, (cls_p, _) in enumerate(gens):
        oof = cls_p["oof"]
        m = classification_metrics(table.study_targets(oof["image_id"]), oof.iloc[:, 2:].to_numpy(),
                                   list(table.study_classes), table.label_mode)
        records.append({"generation": g, "model": f"efficientnet_b{g}", "classifier": {"oof": m, "test": None},
                        "detector_model": "yolov8n.yaml", "detector": {"oof": {"map": 0.3 + 0.05 * g}, "test": None}})
    return {"generations": records, "cycles": cycles, "oracle": None, "gap_closed": {}, "gate": gate, "data": {},
            "stages": [], "wall_seconds": 12.5}


def _config(run: Path, *, size, k, mode, detector, cycles) -> EngineConfig:
    d = config_to_dict(EngineConfig())
    return load_config(base={**d, "preprocess": {**d["preprocess"], "size": size},
                             "folds": {"k": k, "seed": 0, "phash_max_distance": 0},
                             "pseudo": {**d["pseudo"], "target_precision": 0.8 if mode == "multiclass" else 0.0,
                                        "confidence": 0.7},
                             "detector": {**d["detector"], "enabled": detector},
                             "run": {**d["run"], "cycles": cycles, "out": str(run)}})


def _write_data(run: Path, cfg: EngineConfig, table: ItemTable, truth: ItemTable, labeled: list[str]) -> pd.Series:
    """config.yaml and data/ (tables, hidden truth, folds); returns the folds."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    save_table(run / "data", table)
    save_table(run / "data" / "truth", truth)
    k = cfg.folds.k
    folds = pd.Series([j % k for j in range(len(labeled))], index=pd.Index(labeled, name="image_id"), name="fold")
    write_table(run / "data" / "folds.csv", folds.reset_index())
    write_table(run / "data" / "groups.csv", pd.DataFrame({"image_id": labeled, "group": labeled}))
    write_json(run / "data" / "fold_report.json", {"k": k, "groups": len(labeled)})
    return folds


def _write_generations(run, cfg, rng, table, truth, world: dict, folds: pd.Series, *, summary: bool) -> None:
    """Generations 0..cycles (predictions), the pseudo stage of each cycle, final/ and summary.json."""
    ids, roles, box_labeled = world["ids"], world["roles"], world["box_labeled"]
    labeled = list(folds.index)
    pool_ids = [i for i, r in zip(ids, roles) if r != "labeled"]
    unlabeled = [i for i, r in zip(ids, roles) if r == "unlabeled"]
    det_labeled = [i for i, bl in zip(labeled, box_labeled) if bl]
    det_pool = [i for i, r, bl in zip(ids, roles, box_labeled) if r == "unlabeled" or (r == "labeled" and not bl)]
    det_predicted = det_pool + [i for i, r in zip(ids, roles) if r == "test"]
    classes, mode, k = list(table.study_classes), table.label_mode, cfg.folds.k
    gens, cycle_recs = [], []
    for g in range(cfg.run.cycles + 1):
        cls_p = _classifier_preds(rng, g, ids, world["y_true"], folds, pool_ids, mode, k, classes)
        for name, df in cls_p.items():
            write_table(run / f"gen{g}" / "classifier" / "predictions" / f"{name}.csv", df)
        det_p = None
        if cfg.detector.enabled:
            det_p = _detector_preds(rng, g, world["truth_boxes"], det_labeled, folds, det_predicted, k,
                                    len(table.box_classes))
            for name, df in det_p.items():
                write_table(run / f"gen{g}" / "detector" / "predictions" / f"{name}.csv", df)
        gens.append((cls_p, det_p))
        if g < cfg.run.cycles:
            rec = _select(run, cfg, table, truth, g + 1, cls_p, det_p, unlabeled, det_pool, cfg.run.seed)
            cycle_recs.append({"cycle": g + 1, "pseudo": rec, "teacher": g, "student": g + 1})
    gate = _final(run, table, *gens[-1])
    record = _summary(table, gens, cycle_recs, gate)
    for rec in record["generations"]:  # as the runner does when each generation ends
        write_json(run / f"gen{rec['generation']}" / "metrics.json", rec)
    if summary:
        write_json(run / "summary.json", record)


QUARANTINE = pd.DataFrame([{"file": "/data/PATIENT-SECRET-dir/labels.csv", "row": 7, "image_id": "bad01",
                            "problem": "/data/PATIENT-SECRET-dir/labels.csv: box (1.2, 0.1, 1.4, 0.3) lies outside the image"},
                           {"file": "/data/raw/bad02.dicom", "row": None, "image_id": "bad02",
                            "problem": "unreadable DICOM (truncated pixel data)"}])


def make_synthetic_run(root: Path, *, image_paths=None, n_labeled=18, n_unlabeled=10, n_test=4,
                       classes=("No Finding", "Abnormal"), box_classes=("Right Lung", "Left Lung"), k=3, cycles=2,
                       size=64, mode="multiclass", seed=0, summary=True, detector=True) -> dict:
    """Write a synthetic run in loops.cycle's layout; return run dir, in-memory loader and patient ids.

    ``image_paths`` (real PNGs) are cached with the real ImageCache in ``<run>/cache``; without them
    the images exist only in memory (synthetic arrays) and the run has no cache. Two labeled images
    (``flipped``) carry the wrong label, for the label-issue check to find.
    """
    rng = np.random.default_rng(seed)
    run = Path(root)
    n = n_labeled + n_unlabeled + n_test
    ids = [f"img{i:04d}" for i in range(n)]
    roles = ["labeled"] * n_labeled + ["unlabeled"] * n_unlabeled + ["test"] * n_test
    patients = [f"PATIENT-SECRET-{i // 2:03d}" for i in range(n)]
    paths, sizes, arrays = _images(image_paths, ids, size, rng)
    y_true = _truth(rng, n, len(classes), mode)
    y_given = y_true.copy()
    flipped = [ids[i] for i in (1, 4)] if mode == "multiclass" else []
    for i in (1, 4)[: len(flipped)]:
        y_given[i] = y_given[i][::-1]
    truth_boxes = {i: _boxes_for(rng, i, bool(a), len(box_classes)) for i, a in zip(ids, y_true[:, 1:].max(axis=1) > 0)}
    box_labeled = [r != "unlabeled" and (j % 5 != 3) for j, r in enumerate(roles)]
    items = _items(rng, ids, roles, patients, paths, sizes, y_given, box_labeled, classes)
    table = _table(items, [b for i, bl in zip(ids, box_labeled) if bl for b in truth_boxes[i]], classes, box_classes,
                   mode, QUARANTINE)
    truth_items = _items(rng, ids, ["labeled"] * n, patients, paths, sizes, y_true, [True] * n, classes)
    truth = _table(truth_items, [b for i in ids for b in truth_boxes[i]], classes, box_classes, mode)
    cfg = _config(run, size=size, k=k, mode=mode, detector=detector, cycles=cycles)
    folds = _write_data(run, cfg, table, truth, ids[:n_labeled])
    world = {"ids": ids, "roles": roles, "box_labeled": box_labeled, "y_true": y_true, "truth_boxes": truth_boxes}
    _write_generations(run, cfg, rng, table, truth, world, folds, summary=summary)
    return {"run": run, "load": _loader(run, table, arrays, size), "patients": sorted(set(patients)),
            "flipped": flipped, "ids": ids, "cfg": cfg}


def _loader(run: Path, table: ItemTable, arrays: dict | None, size: int):
    """The tiny in-memory loader; with real files, filled from a real cache built in <run>/cache."""
    if arrays is None:
        from cxr_noisy_student.datasets.cache import ImageCache
        from cxr_noisy_student.datasets.config import PreprocessConfig

        cache = ImageCache(run / "cache", PreprocessConfig(size=size))
        failures = cache.build(table.items[["image_id", "path"]], workers=0)
        assert failures.empty, failures
        arrays = {i: cache.load(i) for i in table.items["image_id"]}
    return lambda image_id: arrays[image_id]


# ============================================================================ fixtures


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, cxr_dir):
    paths = sorted((cxr_dir / "images").glob("*.png"))[:32]
    made = make_synthetic_run(tmp_path_factory.mktemp("run") / "demo", image_paths=paths)
    made["reports"] = [write_cycle_report(made["run"], 1),  # load=None: the run's own cache, from config.yaml
                       write_cycle_report(made["run"], 2, load=made["load"])]  # the in-memory loader
    made["index"] = write_index(made["run"])
    return made


# ============================================================================ pure functions


def test_ece_matches_a_hand_computation():
    # bins of width 0.1, (lo, hi]: 0.95, 0.95 -> (0.9, 1.0]; 0.75 -> (0.7, 0.8]; 0.25 -> (0.2, 0.3]
    conf = np.array([0.95, 0.95, 0.75, 0.25])
    correct = np.array([1, 0, 1, 0])
    # |0.5 - 0.95| * 2/4 + |1 - 0.75| * 1/4 + |0 - 0.25| * 1/4 = 0.225 + 0.0625 + 0.0625
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.35)
    assert expected_calibration_error(np.array([0.8] * 5), np.array([1, 1, 1, 1, 0])) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))


def test_reliability_bins_are_right_closed_and_reject_bad_input():
    table = reliability_table(np.array([0.0, 0.1, 0.1000001, 1.0]), np.array([1, 0, 1, 1]), n_bins=10)
    assert table["count"].tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert table.loc[0, "accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in length"):
        reliability_table(np.array([0.5]), np.array([1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_table(np.array([1.5]), np.array([1]))


def test_verdict_rules_in_order():
    common = dict(target_precision=0.8)
    assert verdict(precision=0.95, low=0.9, high=0.99, n_oof=200, ece=0.03, kept=0, **common)[0] == "none kept"
    word, rule = verdict(precision=np.nan, low=np.nan, high=np.nan, n_oof=0, ece=np.nan, kept=0, threshold=np.inf, **common)
    assert word == "none kept" and "'never'" in rule and "passed the threshold" not in rule
    assert verdict(precision=float("nan"), low=np.nan, high=np.nan, n_oof=0, ece=0.03, kept=5, **common)[0] == "review"
    word, rule = verdict(precision=0.6, low=0.55, high=0.65, n_oof=300, ece=0.03, kept=40, **common)
    assert word == "do not use" and "upper bound" in rule
    assert verdict(precision=0.93, low=0.88, high=0.96, n_oof=300, ece=0.04, kept=40, **common)[0] == "trust"
    word, rule = verdict(precision=0.93, low=0.88, high=0.96, n_oof=300, ece=0.2, kept=40, **common)
    assert word == "review" and "ECE" in rule
    word, rule = verdict(precision=1.0, low=0.6, high=1.0, n_oof=5, ece=0.02, kept=40, **common)
    assert word == "review" and "too little evidence" in rule
    # hard labels / boxes: calibration is shown but does not decide
    assert verdict(precision=0.93, low=0.88, high=0.96, n_oof=300, ece=0.2, kept=40, max_ece=None, **common)[0] == "trust"


def test_true_positive_mask_matches_greedily_by_score_within_class():
    gt = pd.DataFrame({"image_id": ["a", "a"], "class_id": [0, 1], "x_min": [0.1, 0.5], "y_min": [0.1, 0.5],
                       "x_max": [0.4, 0.9], "y_max": [0.4, 0.9]})
    pred = pd.DataFrame({"image_id": ["a", "a", "a", "b"], "class_id": [0, 0, 0, 0], "score": [0.5, 0.9, 0.8, 0.99],
                         "x_min": [0.1, 0.12, 0.5, 0.1], "y_min": [0.1, 0.1, 0.5, 0.1], "x_max": [0.4, 0.4, 0.9, 0.4],
                         "y_max": [0.4, 0.42, 0.9, 0.4]}, index=[10, 11, 12, 13])
    # the 0.9 box takes the only class-0 GT; the exact 0.5 copy comes too late; the box over the class-1
    # GT has the wrong class; image b has no GT at all
    assert true_positive_mask(pred, gt, iou_thr=0.5).tolist() == [False, True, False, False]


def test_label_issues_finds_flipped_labels():
    rng = np.random.default_rng(1)
    y = np.eye(2)[rng.integers(0, 2, 60)]
    probs = np.clip(y * 0.85 + 0.075 + rng.normal(0, 0.03, y.shape), 0.01, 0.99)
    probs /= probs.sum(axis=1, keepdims=True)
    noisy = y.copy()
    noisy[[3, 17, 40]] = noisy[[3, 17, 40], ::-1]
    found = label_issues(probs, noisy, mode="multiclass")
    assert set(found[:3].tolist()) == {3, 17, 40}
    multi = label_issues(np.c_[probs, probs[:, ::-1]], np.c_[noisy, noisy[:, ::-1]], mode="multilabel")
    assert {3, 17, 40} <= set(multi.tolist())


# ============================================================================ the report


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_is_self_contained_with_valid_figures(synthetic_run):
    for path in synthetic_run["reports"]:
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), "external reference"
        assert "<script" not in text.lower() and "@import" not in text and "url(" not in text
        srcs = re.findall(r'src="([^"]*)"', text)
        assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
        pngs = embedded_pngs(text)
        assert len(pngs) == len(srcs) >= 30  # figures + thumbnails
        for data in pngs:
            image = Image.open(io.BytesIO(data))
            image.load()
            assert image.format == "PNG" and 48 <= min(image.size) and max(image.size) <= 4000
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 2, "blank image"


def test_report_json_has_verdicts_and_ece(synthetic_run):
    run = synthetic_run["run"]
    text = (run / "cycle1" / "report.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    classes = data["verdicts"]["classes"]
    assert [c["name"] for c in classes] == ["No Finding", "Abnormal"]
    assert {c["verdict"] for c in classes} <= VERDICTS and all(c["rule"] for c in classes)
    assert [b["name"] for b in data["verdicts"]["boxes"]] == ["Right Lung", "Left Lung"]
    # the reported ECE is the ECE of the teacher's OOF top-label confidence, recomputed here
    oof = pd.read_csv(run / "gen0" / "classifier" / "predictions" / "oof.csv", dtype={"image_id": str})
    items = pd.read_csv(run / "data" / "items.csv", dtype={"image_id": str}).set_index("image_id")
    p = oof[["p:No Finding", "p:Abnormal"]].to_numpy()
    y = items.loc[oof["image_id"], ["y:No Finding", "y:Abnormal"]].to_numpy()
    expected = expected_calibration_error(p.max(1), p.argmax(1) == y.argmax(1))
    assert data["calibration"]["ece"] == pytest.approx(expected)
    assert 0 <= data["calibration"]["ece"] <= 1
    # kept counts agree with the selection the cycle wrote
    sel = pd.read_csv(run / "cycle1" / "pseudo" / "class_selection.csv")
    assert sum(c["kept"] for c in classes) == int(sel["kept"].sum())
    assert data["build"]["html_bytes"] == (run / "cycle1" / "report.html").stat().st_size


def test_report_shows_no_patient_data(synthetic_run):
    for path in synthetic_run["reports"]:
        for text in (path.read_text(), path.with_suffix(".json").read_text()):
            assert "PATIENT-SECRET" not in text and "patient_id" not in text
            assert "img0020" in text or "img0019" in text  # image ids are what identifies an image


def test_label_issues_rank_the_mislabeled_images_first(synthetic_run):
    data = json.loads((synthetic_run["run"] / "cycle2" / "report.json").read_text())
    ranked = [row["image_id"] for row in data["label_issues"]["issues"]]
    assert set(synthetic_run["flipped"]) <= set(ranked[:4])


def test_drift_reads_every_earlier_cycle(synthetic_run):
    data = json.loads((synthetic_run["run"] / "cycle2" / "report.json").read_text())
    drift = data["drift"]
    assert [row["cycle"] for row in drift["cycles"]] == [1, 2]
    assert [(f["from"], f["to"]) for f in drift["flips"]] == [(0, 1), (1, 2)]
    assert all(0 <= f["flip_rate"] <= 1 for f in drift["flips"])
    assert [g["generation"] for g in drift["generations"]] == [0, 1, 2]
    assert {g["source"] for g in drift["generations"]} == {"metrics.json"}
    assert drift["cycles"][1]["flip_rate"] == pytest.approx(drift["flips"][0]["flip_rate"])


def test_multilabel_run_without_summary_or_images(tmp_path):
    """Metrics read from gen<g>/metrics.json while summary.json is absent (a run still going); a
    generation without it has no row (nothing is recomputed); no cache: the grids say so."""
    made = make_synthetic_run(tmp_path / "nosum", image_paths=None, n_labeled=15, n_unlabeled=9, n_test=3, cycles=1,
                              summary=False, seed=3, mode="multilabel")
    (made["run"] / "gen1" / "metrics.json").unlink()  # the student is still training
    path = write_cycle_report(made["run"], 1, status="its student is training")
    data = json.loads(path.with_suffix(".json").read_text())
    assert [(g["generation"], g["source"]) for g in data["drift"]["generations"]] == [(0, "metrics.json")]
    assert 0.5 < data["drift"]["generations"][0]["auc_oof"] <= 1
    assert data["headline"]["status"] == "its student is training" and "its student is training" in path.read_text()
    assert data["label_mode"] == "multilabel" and "is not in the cache" in data["grids"]["thumbnail_failures"][0]
    assert "could not be loaded" in path.read_text()
    assert {c["verdict"] for c in data["verdicts"]["classes"]} <= VERDICTS
    assert data["calibration"]["ece"] is not None


def test_default_loader_reads_the_run_cache(synthetic_run):
    path = synthetic_run["reports"][0]  # built with load=None -> <run>/cache from config.yaml
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["grids"]["thumbnail_failures"] == []
    assert len(embedded_pngs(path.read_text())) >= 30


def test_index_links_every_cycle(synthetic_run):
    text = synthetic_run["index"].read_text()
    links = re.findall(r'href="([^"]+)"', text)
    assert "cycle1/report.html" in links and "cycle2/report.html" in links
    for link in (x for x in links if not x.startswith("#")):
        assert (synthetic_run["run"] / link).exists()
    assert "efficientnet_b2" in text and "<script" not in text


def test_missing_cycle_is_a_one_line_error(synthetic_run, tmp_path):
    with pytest.raises(DataError, match=r"cycle 5 has not made pseudo labels yet \(cycles run: 1, 2\)") as err:
        write_cycle_report(synthetic_run["run"], 5)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="not a run directory"):
        write_cycle_report(tmp_path / "nowhere", 1)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium is not installed")
def test_report_renders_in_headless_chromium(synthetic_run, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,2000", synthetic_run["reports"][0].as_uri()], check=True, timeout=60,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[0] >= 1000 and pixels.std() > 5


@pytest.mark.skipif(not os.environ.get("CXR_REPORT_BENCH"), reason="set CXR_REPORT_BENCH=1 to measure a realistic report")
def test_report_size_and_time_realistic(tmp_path):
    made = make_synthetic_run(tmp_path / "big", n_labeled=600, n_unlabeled=1500, n_test=200, k=5, cycles=3, size=128,
                              classes=("No finding", "Mild", "Moderate", "Severe"),
                              box_classes=tuple(f"finding {i}" for i in range(14)))
    start = time.perf_counter()
    path = write_cycle_report(made["run"], 3, load=made["load"])
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"\nrealistic report: {size / 1e6:.2f} MB, built in {seconds:.1f} s")
    assert size < 8e6 and seconds < 120


# ============================================================================ headline


def test_students_per_class_sums_folds_and_weights_precision():
    from cxr_noisy_student.teacher_student.report.headline import students_per_class

    folds = [{"kept_per_class": {"A": 3, "B": 1}, "precision_per_class": {"A": 1.0, "B": 0.0}, "fallback": {"B": 1}},
             {"kept_per_class": {"A": 1}, "precision_per_class": {"A": 0.0}, "fallback": {}}]
    got = students_per_class(folds, "kept_per_class")
    # A: 3 right of 3 in fold 0, 0 of 1 in fold 1 -> 3 / 4; B: 0 of 1, kept by the fallback
    assert got == {"A": {"n": 4, "precision": 0.75, "fallback": 0}, "B": {"n": 1, "precision": 0.0, "fallback": 1}}
    assert students_per_class([{"per_class": {"A": 2}}], "per_class")["A"]["precision"] is None  # no hidden truth


def test_verdict_sentence_says_what_the_students_got():
    from cxr_noisy_student.teacher_student.report.headline import verdict_sentence

    classes = {"Abnormal": {"n": 80, "precision": 0.9, "fallback": 0}, "No finding": {"n": 20, "precision": 0.5, "fallback": 0}}
    boxes = {"Nodule": {"n": 0, "precision": None, "fallback": 0}}
    text = verdict_sentence(cycle=2, folds=5, classes=classes, boxes=boxes, negatives=7, has_truth=True)
    # (80 * 0.9 + 20 * 0.5) / 100 = 0.82
    assert text == ("Cycle 2's students (5 folds, each trained on its own teacher fold's pseudo labels) got 100 pseudo "
                    "labels, 82% right against the hidden truth (Abnormal 80 at 90%; No finding 20 at 50%), no pseudo "
                    "boxes and 7 negative images (no finding).")
    none = verdict_sentence(cycle=1, folds=2, classes={"A": {"n": 0, "precision": None, "fallback": 0}}, boxes=None)
    assert none.endswith("got no pseudo labels: they learned from the labeled images only.")
    blind = verdict_sentence(cycle=1, folds=2, classes={"A": {"n": 3, "precision": None, "fallback": 0}}, boxes=None)
    assert "precision unknown (no hidden truth" in blind


def test_starving_classes_are_grouped_into_red_flags():
    from cxr_noisy_student.teacher_student.report.headline import flag_lines, starving_groups

    weak = "threshold rests on 1 OOF prediction(s) (< 10)"
    folds = [{"starving": {"No finding": weak, "X": "no pool image reaches its threshold"}, "fallback": {"No finding": 4},
              "thresholds": {"No finding": 0.9, "X": None}},
             {"starving": {"No finding": weak}, "fallback": {"No finding": 2}, "thresholds": {"No finding": 0.8}}]
    groups = starving_groups(folds)
    assert {"classes": ["No finding"], "reason": weak, "folds": [0, 1], "fallback": 6, "kept": 0, "mode": None} in groups
    never = next(g for g in groups if g["classes"] == ["X"])
    assert never["reason"].startswith("threshold 'never'") and never["folds"] == [0]
    lines = flag_lines("Class", groups, folds=2)
    assert f"Class No finding starves in every fold: {weak}; the top-k fallback kept 6 in their place." in lines
    assert any(line.startswith("Class X starves in fold 0: threshold 'never'") and "learns nothing of it" in line
               for line in lines)
    weak_box = {"starving": {"Nodule": "threshold rests on 3 OOF box(es) (< 10)"}, "fallback": {}, "fallback_mode": "none"}
    kept = flag_lines("Box class", starving_groups([{**weak_box, "per_class": {"Nodule": 36}}], "per_class"), folds=1)
    assert kept == ["Box class Nodule starves in every fold: threshold rests on 3 OOF box(es) (< 10); "
                    "kept anyway on that evidence: 36, flagged (fallback none)."]
    dropped = flag_lines("Box class", starving_groups([{**weak_box, "fallback_mode": "drop"}], "per_class"), folds=1)
    assert dropped[0].endswith("the student learns nothing of it.")
    many = starving_groups([{"starving": {f"c{i}": "no pool box reaches its threshold" for i in range(9)}}])
    assert flag_lines("Box class", many, folds=1)[0].startswith("Box class c0, c1, c2, c3, c4, c5 and 3 more (9) starve")


def with_fold_selections(run: Path, cycle: int, k: int) -> None:
    """Per-fold selection records (as the engine writes them) into a synthetic run: a weak class."""
    base = json.loads((run / f"cycle{cycle}" / "pseudo" / "class_pseudo.json").read_text())
    for fold in range(k):
        info = {**base, "kept_per_class": {"Abnormal": 5 + fold}, "precision_per_class": {"Abnormal": 0.8},
                "starving": {"No Finding": "threshold rests on 1 OOF prediction(s) (< 10)"}, "fallback": {"No Finding": 3}}
        write_json(run / f"cycle{cycle}" / "pseudo" / f"fold{fold}" / "class_pseudo.json", info)


@pytest.fixture(scope="module")
def headline_run(tmp_path_factory, cxr_dir):
    made = make_synthetic_run(tmp_path_factory.mktemp("head") / "demo",
                              image_paths=sorted((cxr_dir / "images").glob("*.png"))[:32], cycles=1)
    with_fold_selections(made["run"], 1, made["cfg"].folds.k)
    made["report"] = write_cycle_report(made["run"], 1, load=made["load"])
    return made


def test_report_leads_with_the_students_and_flags_starving_classes(headline_run):
    path = headline_run["report"]
    data = json.loads(path.with_suffix(".json").read_text())
    head = data["headline"]
    assert head["sentence"].startswith("Cycle 1's students (3 folds") and "18 pseudo labels, 80% right" in head["sentence"]
    assert head["flags"] == ["Class No Finding starves in every fold: threshold rests on 1 OOF prediction(s) (< 10); "
                             "the top-k fallback kept 9 in their place."]
    text = path.read_text()
    first = text.index('<div class="headline">')
    assert first < text.index('id="verdict"') < text.index('id="precision"')  # the verdict before the evidence
    assert "<ul class=\"flags\"><li>Class No Finding starves" in text
    assert "(none)" not in text  # empty grid rows and tables are left out, not shown empty


def test_index_shows_gains_and_reference_models(tmp_path):
    from cxr_noisy_student.teacher_student.report.build import gain_rows, summary_rows

    summary = {"generations": [{"generation": 0, "model": "a", "classifier": {"test": {"auc_macro": 0.7}}}],
               "cycles": [], "ablation": {"classifier_model": "b", "classifier": {"test": {"auc_macro": 0.72}}},
               "oracle": {"classifier_model": "b", "classifier": {"test": {"auc_macro": 0.9}}},
               "gains": {"classifier_auc": {"teacher": 0.7, "student": 0.8, "ablation": 0.72, "oracle": 0.9,
                                            "student_minus_ablation": 0.08, "student_minus_teacher": 0.1, "gap_closed": 0.5},
                         "detector_map": {"teacher": 0.3, "student": 0.3, "ablation": 0.3, "oracle": 0.2,
                                          "student_minus_ablation": 0.0, "student_minus_teacher": 0.0,
                                          "gap_closed": "undefined: the oracle (0.200) does not beat the teacher"}}}
    rows = gain_rows(summary["gains"])
    assert rows[0]["gap closed"] == 0.5 and rows[1]["gap closed"].startswith("undefined: the oracle")
    assert [r["generation"] for r in summary_rows(summary)] == [0, "ablation", "oracle"]
    run = tmp_path / "r"
    run.mkdir()
    write_json(run / "summary.json", summary)
    text = write_index(run).read_text()
    assert "What the pseudo labels gave" in text and "undefined: the oracle (0.200)" in text and ">+0.080<" in text


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


def screenshot(page: Path, shot: Path, size: str = "1280,800") -> np.ndarray:
    """A headless Chromium screenshot of ``page`` (the first screen at ``size``), as an RGB array."""
    subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--screenshot={shot}", f"--window-size={size}", page.as_uri()],
                   check=True, timeout=90, capture_output=True)
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def flag_red_pixels(pixels: np.ndarray) -> int:
    """Pixels of the red flag text (#b00020), anti-aliasing allowed."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((r > 140) & (g < 60) & (b < 80)).sum())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium is not installed")
def test_the_verdict_is_in_the_first_screen_in_headless_chromium(headline_run, tmp_path):
    pixels = screenshot(headline_run["report"], tmp_path / "first.png")
    assert pixels.shape[:2] == (800, 1280) and pixels.std() > 5
    assert flag_red_pixels(pixels) > 200, "the red flags of the headline are not on the first screen"
