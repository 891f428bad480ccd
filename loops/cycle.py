"""The cycle runner: data -> generation 0 (teachers) -> for each cycle: pseudo labels -> student.

Every step is a :class:`loops.stages.Stage` whose fingerprint covers the config slice and the
inputs that made it (file digests of the previous stage's outputs), so rerunning the same command
after a kill skips what is done and redoes only what was cut short; changing a setting redoes
exactly the stages it affects. Run layout (see the README's "Output layout")::

    <out>/config.yaml            resolved config
    <out>/data/                  items.csv, boxes.csv, quarantine.csv, folds.csv, fold_report.json
    <out>/gen<g>/classifier/     fold<i>/checkpoint.pt, predictions/{oof,pool,pool_folds}.csv
    <out>/gen<g>/detector/       fold<i>/..., predictions/{oof_boxes,pool_raw,pool_fused}.csv
    <out>/cycle<c>/pseudo/       the pseudo labels generation c trains on (made by generation c-1)
    <out>/final/                 gated predictions, submissions, metrics
    <out>/summary.json           per-cycle metrics, pseudo-label counts and precision, stage times
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import yaml

from ..datasets.table import ItemTable, Quarantine, load_table, save_table

from ..datasets.errors import DataError
from .stages import Stage
from ..datasets.atomic import atomic_path, read_json, read_table, write_json, write_table
from ..teacher_student import classification as cls
from ..teacher_student import detection as det
from ..teacher_student import gating, pseudo
from ..teacher_student.config import EngineConfig, matched_epochs
from ..datasets.config import config_to_dict, fingerprint

log = logging.getLogger("cxr.cycle")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def file_digest(*paths: Path) -> str:
    """Content digest of stage outputs, chaining a stage's fingerprint to its inputs."""
    h = hashlib.sha256()
    for path in paths:
        for f in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            if f.is_file() and f.suffix in (".csv", ".json", ".txt"):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def source_digest(root: Path) -> str:
    """Cheap digest of the data root (names, sizes, mtimes), so edited inputs redo the data stage."""
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class Run:
    """What every stage of one run shares."""

    cfg: EngineConfig
    out: Path
    table: ItemTable
    truth: ItemTable | None
    folds: pd.Series
    device: torch.device
    load_for: Callable
    records: list = field(default_factory=list)

    def stage(self, where: Path, name: str, payload: dict, fn: Callable) -> dict:
        record = Stage(where, name, fingerprint(payload)).run(fn)
        record["path"] = str((where / name).relative_to(self.out))
        self.records.append(record)
        verb = "reused" if record["skipped"] else f"done in {record['seconds']:.1f}s"
        log.info("stage %s %s", record["path"], verb)
        return record

    @property
    def labeled_ids(self) -> list[str]:
        return list(self.folds.index)

    @property
    def box_labeled(self) -> set[str]:
        return set(self.table.items.loc[self.table.items["box_labeled"], "image_id"])

    @property
    def det_labeled_ids(self) -> list[str]:
        """Labeled images whose boxes are ground truth: the ones detectors train on and score."""
        boxed = self.box_labeled
        return [i for i in self.folds.index if i in boxed]

    def ids(self, *roles: str) -> list[str]:
        return self.table.with_role(*roles)["image_id"].tolist()


# ---------------------------------------------------------------------------------- data


def prepare(cfg: EngineConfig) -> Run:
    """Load and validate the data, build the preprocessing cache, assign leak-free folds."""
    from ..datasets.adapters import load_dataset, load_hidden_truth
    from ..datasets.cache import ImageCache
    from ..datasets.folds import assign_folds, check_no_leak

    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    root = Path(cfg.data.root)
    if cfg.data.format == "demo":
        from ..datasets.demo import make_demo_dataset

        if len(cfg.data.demo_counts) != 3:
            raise DataError("data.demo_counts: give three numbers: labeled, unlabeled, test")
        labeled, unlabeled, test = cfg.data.demo_counts
        make_demo_dataset(root, n_labeled=labeled, n_unlabeled=unlabeled, n_test=test, size=cfg.data.demo_image_size)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (set --data or data.root)")
    cache = ImageCache(Path(cfg.run.cache_dir or out / "cache"), cfg.preprocess)

    def build(stage_dir: Path) -> dict:
        table = load_dataset(cfg.data)
        failures = cache.build(table.items[["image_id", "path"]], workers=cfg.run.workers)
        if cfg.data.on_bad_input == "error" and len(failures):  # decoding found what headers could not
            bad = failures.iloc[0]
            Quarantine("error").reject(bad["path"], None, bad["image_id"], bad["problem"])
        table = drop_unreadable(table, failures)
        fa = assign_folds(table.with_role("labeled"), cache.hashes(), k=cfg.folds.k, seed=cfg.folds.seed,
                          phash_max_distance=cfg.folds.phash_max_distance)
        save_table(stage_dir, table)
        write_table(stage_dir / "folds.csv", fa.folds.rename("fold").rename_axis("image_id").reset_index())
        write_table(stage_dir / "groups.csv", fa.groups.rename("group").rename_axis("image_id").reset_index())
        write_json(stage_dir / "fold_report.json", fa.report)
        truth = load_hidden_truth(cfg.data)
        if truth is not None:
            save_table(stage_dir / "truth", truth)
        return {"table": table.summary(), "quarantined": int(len(table.quarantine)), "folds": fa.report}

    payload = {"data": config_to_dict(cfg.data), "pre": config_to_dict(cfg.preprocess),
               "folds": config_to_dict(cfg.folds), "source": source_digest(root)}
    run = Run(cfg, out, None, None, None, resolve_device(cfg.run.device), None)  # type: ignore[arg-type]
    run.stage(out, "data", payload, build)
    run.table = load_table(out / "data")
    run.truth = load_table(out / "data" / "truth") if (out / "data" / "truth" / "table.json").exists() else None
    folds = read_table(out / "data" / "folds.csv").set_index("image_id")["fold"]
    groups = read_table(out / "data" / "groups.csv").set_index("image_id")["group"]
    check_no_leak(folds, groups)  # run-time guard: no patient or duplicate group straddles folds
    run.folds = folds
    report_quarantine(run.table)
    run.load_for = lambda meta: ImageCache(Path(cfg.run.cache_dir or out / "cache"), preprocess_of(meta)).load
    return run


def preprocess_of(meta: dict):
    from .checkpoint import preprocess_from_meta

    return preprocess_from_meta(meta)


def drop_unreadable(table: ItemTable, failures: pd.DataFrame) -> ItemTable:
    """Images the cache could not decode move to the quarantine with the reader's message."""
    if failures is None or failures.empty:
        return table
    bad = set(failures["image_id"])
    rows = pd.DataFrame({"file": failures["path"].astype(str), "row": None, "image_id": failures["image_id"],
                         "problem": failures["problem"]})
    return table.replace(items=table.items[~table.items["image_id"].isin(bad)].reset_index(drop=True),
                         boxes=table.boxes[~table.boxes["image_id"].isin(bad)].reset_index(drop=True),
                         quarantine=pd.concat([table.quarantine, rows], ignore_index=True))


def report_quarantine(table: ItemTable) -> None:
    q = table.quarantine
    if len(q):
        log.warning("%d input rows/files quarantined (see data/quarantine.csv); first: %s", len(q),
                    "; ".join(f"{r.file}, row {r.row}: {r.problem}" for r in q.head(3).itertuples()))


# ------------------------------------------------------------------------- classification


def classifier_generation(run: Run, gen: int, pseudo_dir: Path | None, prev_pred: Path | None, *,
                          name: str | None = None, table: ItemTable | None = None, extra_ids: tuple = ()) -> Path:
    """Train generation ``gen``'s k fold classifiers and write its predictions; return their dir.

    ``name``/``table``/``extra_ids`` let the oracle reuse this with its own directory, a table
    holding the hidden truth, and the unlabeled pool added to every fold's training set.
    """
    cfg, table = run.cfg, table or run.table
    gen_dir = run.out / (name or f"gen{gen}") / "classifier"
    oof = read_table(prev_pred / "oof.csv") if prev_pred else None
    pool = read_table(prev_pred / "pool.csv") if prev_pred and (prev_pred / "pool.csv").exists() else None
    selected = read_table(pseudo_dir / "class_pseudo.csv") if pseudo_dir else None
    base = {"classifier": config_to_dict(cfg.classifier), "augment": config_to_dict(cfg.augment),
            "pre": config_to_dict(cfg.preprocess), "pseudo": config_to_dict(cfg.pseudo), "seed": cfg.run.seed,
            "gen": gen}
    load = run.load_for({"preprocess": config_to_dict(cfg.preprocess)})
    for fold in range(cfg.folds.k):
        train_ids = [i for i in run.labeled_ids if run.folds[i] != fold] + list(extra_ids)
        val_ids = [i for i in run.labeled_ids if run.folds[i] == fold]
        ts = cls.student_targets(cfg, table, train_ids, oof, selected, pool)
        teacher_images = len(train_ids) - len(extra_ids)
        epochs = (cfg.classifier.train.epochs if gen == 0 and not extra_ids else
                  matched_epochs(cfg.classifier.train.epochs, teacher_images, len(ts.image_ids),
                                 cfg.classifier.student_epochs))
        payload = {**base, "fold": fold, "train": fingerprint(ts.fingerprint_payload()), "val": val_ids,
                   "epochs": epochs}
        run.stage(gen_dir, f"fold{fold}", payload,
                  lambda d, f=fold, t=ts, v=val_ids, e=epochs: cls.train_fold(cfg, table, load, gen, f, t, v,
                                                                            run.device, d, log.info, epochs=e))
    pool_ids = run.ids("unlabeled", "test")
    payload = {**base, "models": file_digest(*(gen_dir / f"fold{f}" for f in range(cfg.folds.k))), "pool": pool_ids}
    run.stage(gen_dir, "predictions", payload,
              lambda d: cls.predict_generation(cfg, table, run.load_for, run.folds, gen_dir, pool_ids, run.device, d))
    return gen_dir / "predictions"


def classifier_metrics(run: Run, pred_dir: Path) -> dict:
    preds = cls.load_predictions(pred_dir)
    out = {"oof": cls.evaluate(run.table, preds["oof"])}
    if "pool" in preds:
        pool = preds["pool"]
        out["test"] = cls.evaluate(run.table, pool[pool["image_id"].isin(run.ids("test"))])
        if run.truth is not None:
            out["unlabeled_truth"] = cls.evaluate(run.table, pool[pool["image_id"].isin(run.ids("unlabeled"))],
                                                  truth=run.truth)
    return out


def select_classifier_pseudo(run: Run, pred_dir: Path, out_dir: Path, cycle: int) -> dict:
    """Confidence filter + class balancing of the teacher's unlabeled-pool probabilities."""
    cfg, table = run.cfg, run.table
    preds = cls.load_predictions(pred_dir)
    cols = cls.prob_columns(table.study_classes)
    oof = preds["oof"]
    thresholds = None
    if cfg.pseudo.target_precision > 0:
        thresholds = pseudo.class_thresholds(oof[cols].to_numpy(), table.study_targets(oof["image_id"]),
                                             target_precision=cfg.pseudo.target_precision, mode=table.label_mode)
    pool = preds.get("pool", pd.DataFrame(columns=["image_id", *cols]))
    unlabeled = pool[pool["image_id"].isin(run.ids("unlabeled"))]
    selection = pseudo.select_pseudo(unlabeled["image_id"].tolist(), unlabeled[cols].to_numpy().reshape(-1, len(cols)),
                                     mode=table.label_mode, class_names=list(table.study_classes),
                                     confidence=cfg.pseudo.confidence, thresholds=thresholds)
    balanced = (pseudo.balance_classes(selection, per_class=cfg.pseudo.per_class, seed=cfg.run.seed)
                if cfg.pseudo.balance else selection[selection["kept"]].assign(copies=1))
    provenance = {"cycle": cycle, "source": f"gen{cycle - 1}/classifier", "folds": "|".join(map(str, range(cfg.folds.k)))}
    write_table(out_dir / "class_selection.csv", selection.assign(**provenance))
    write_table(out_dir / "class_pseudo.csv", balanced.assign(**provenance))
    info = {"unlabeled": len(selection), "kept": int(selection["kept"].sum()),
            "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
            "kept_per_class": {k: int(v) for k, v in selection[selection["kept"]]["label"].value_counts().items()},
            "thresholds": None if thresholds is None else dict(zip(table.study_classes, thresholds.tolist())),
            "precision": pseudo_precision(run, selection)}
    write_json(out_dir / "class_pseudo.json", info)
    return info


def pseudo_precision(run: Run, selection: pd.DataFrame) -> float | None:
    """Share of kept pseudo labels that agree with the hidden truth (demo); None without truth."""
    if run.truth is None or run.table.label_mode != "multiclass":
        return None
    known = run.truth.items.set_index("image_id")["has_study_label"]
    kept = selection[selection["kept"] & selection["image_id"].map(lambda i: bool(known.get(i, False)))]
    if kept.empty:
        return None
    truth = run.truth.study_targets(kept["image_id"]).argmax(axis=1)
    return float((truth == kept["class_index"].to_numpy()).mean())


# ------------------------------------------------------------------------------ detection


def detection_enabled(run: Run) -> bool:
    return bool(run.cfg.detector.enabled and run.table.box_classes and run.det_labeled_ids)


def det_pool_ids(run: Run) -> list[str]:
    """Unlabeled + test images, and labeled images nobody drew boxes on."""
    items = run.table.items
    pool = items["role"].isin(["unlabeled", "test"]) | ((items["role"] == "labeled") & ~items["box_labeled"])
    return items.loc[pool, "image_id"].tolist()


def detector_generation(run: Run, gen: int, pseudo_dir: Path | None, *, name: str | None = None,
                        table: ItemTable | None = None, extra_ids: tuple = ()) -> Path:
    """Train generation ``gen``'s k fold detectors (ground truth + pseudo boxes) and predict."""
    cfg, table = run.cfg, table or run.table
    gen_dir = run.out / (name or f"gen{gen}") / "detector"
    gt = det.training_boxes(table)
    p_boxes = read_table(pseudo_dir / "box_pseudo.csv") if pseudo_dir else None
    p_images = read_table(pseudo_dir / "box_images.csv") if pseudo_dir else None
    base = {"detector": config_to_dict(cfg.detector), "augment": config_to_dict(cfg.augment),
            "pre": config_to_dict(cfg.preprocess), "seed": cfg.run.seed, "gen": gen}
    load = run.load_for({"preprocess": config_to_dict(cfg.preprocess)})
    for fold in range(cfg.folds.k):
        train_ids = [i for i in run.det_labeled_ids if run.folds[i] != fold] + list(extra_ids)
        val_ids = [i for i in run.det_labeled_ids if run.folds[i] == fold]
        ids, boxes = det.training_set(gt, train_ids, p_boxes, p_images)
        teacher_images = len(train_ids) - len(extra_ids)
        epochs = (cfg.detector.epochs if gen == 0 and not extra_ids else
                  matched_epochs(cfg.detector.epochs, teacher_images, len(ids), cfg.detector.student_epochs))
        payload = {**base, "fold": fold, "ids": ids, "boxes": fingerprint(boxes.round(6).to_dict("list")),
                   "val": val_ids, "epochs": epochs}
        run.stage(gen_dir, f"fold{fold}", payload,
                  lambda d, f=fold, i=ids, b=boxes, v=val_ids, e=epochs: det.train_fold(
                      cfg, table, load, gen, f, i, b, v, run.device, d, log.info, epochs=e))
    pool_ids = det_pool_ids(run)
    payload = {**base, "models": file_digest(*(gen_dir / f"fold{f}" for f in range(cfg.folds.k))), "pool": pool_ids}
    run.stage(gen_dir, "predictions", payload,
              lambda d: det.predict_generation(cfg, load, run.folds, run.det_labeled_ids, gen_dir, pool_ids,
                                               run.device, d))
    return gen_dir / "predictions"


def detector_metrics(run: Run, pred_dir: Path) -> dict:
    iou = run.cfg.detector.metric_iou
    gt = det.training_boxes(run.table)
    oof = read_table(pred_dir / "oof_boxes.csv")
    pool = read_table(pred_dir / "pool_fused.csv")
    boxed = run.box_labeled
    test_ids = [i for i in run.ids("test") if i in boxed]
    out = {"oof": det.evaluate(run.table, gt, oof, run.det_labeled_ids, iou),
           "test": det.evaluate(run.table, gt, pool, test_ids, iou)}
    if run.truth is not None:
        truth_ids = run.truth.items.loc[run.truth.items["box_labeled"], "image_id"].tolist()
        out["unlabeled_truth"] = det.evaluate(run.table, det.training_boxes(run.truth), pool,
                                              [i for i in truth_ids if i in set(run.ids("unlabeled"))], iou)
    return out


def p_abnormal(run: Run, cls_pred: Path) -> pd.Series:
    """Classifier P(abnormal) for every image: OOF for labeled ones, the fold ensemble elsewhere."""
    preds = cls.load_predictions(cls_pred)
    frames = [preds["oof"]] + ([preds["pool"]] if "pool" in preds else [])
    return gating.p_abnormal_series(pd.concat(frames, ignore_index=True), run.table.normal_class)


def select_detector_pseudo(run: Run, det_pred: Path, cls_pred: Path, out_dir: Path, cycle: int) -> dict:
    pool_ids = [i for i in det_pool_ids(run) if i not in set(run.ids("test"))]
    info = det.select_pseudo_boxes(run.cfg, run.table, det.training_boxes(run.table), det_pred, pool_ids,
                                   p_abnormal(run, cls_pred), out_dir, cycle=cycle)
    if run.truth is not None:
        boxes = read_table(out_dir / "box_pseudo.csv")
        truth = det.training_boxes(run.truth)
        known = set(run.truth.items.loc[run.truth.items["box_labeled"], "image_id"])
        boxes = boxes[boxes["image_id"].isin(known)]
        matched = det.mark_true_positives(boxes, truth, iou_thr=run.cfg.detector.metric_iou)
        info["precision"] = float(matched["true_positive"].mean()) if len(matched) else None
        images = read_table(out_dir / "box_images.csv")
        negatives = images[(images["status"] == "negative") & images["image_id"].isin(known)]["image_id"]
        info["negative_precision"] = (float((~negatives.isin(set(truth["image_id"]))).mean())
                                      if len(negatives) else None)
    write_json(out_dir / "box_pseudo.json", info)
    return info


# ----------------------------------------------------------------------------- the gate


def final_stage(run: Run, cls_pred: Path, det_pred: Path | None, out_dir: Path) -> dict:
    """Gate the last detector with the last classifier; write predictions and submissions."""
    cfg, table = run.cfg, run.table
    probs = cls.load_predictions(cls_pred)
    pool_probs = probs.get("pool", probs["oof"].iloc[:0])
    write_table(out_dir / "class_predictions.csv", pd.concat([probs["oof"].assign(split="oof"),
                                                              pool_probs.assign(split="pool")], ignore_index=True))
    result: dict = {}
    if det_pred is None:
        return result
    gate = tune_or_fixed_gate(run, cls_pred, det_pred)
    nf = len(table.box_classes)
    p_ab = p_abnormal(run, cls_pred)
    pool = read_table(det_pred / "pool_fused.csv")
    oof = read_table(det_pred / "oof_boxes.csv")
    boxes = pd.concat([oof.drop(columns=["fold"], errors="ignore"), pool], ignore_index=True)
    gated = pseudo.gate_predictions(boxes[boxes["image_id"].isin(p_ab.index)], p_ab, no_finding_class=nf,
                                    low=gate["low"], high=gate["high"], mode=cfg.gate.mode)
    write_table(out_dir / "box_predictions_raw.csv", boxes)
    write_table(out_dir / "box_predictions_gated.csv", gated)
    boxed = run.box_labeled
    test_ids = [i for i in run.ids("test") if i in boxed]
    scores = {}
    for label, ids in (("oof", run.det_labeled_ids), ("test", test_ids)):
        if ids:
            kw = dict(class_names=list(table.box_classes), iou_thr=cfg.detector.metric_iou)
            scores[label] = {"ungated": gating.gated_map(boxes, p_ab, det.training_boxes(table), ids, mode="off",
                                                         low=0, high=1, **kw)["map"],
                             "gated": gating.gated_map(boxes, p_ab, det.training_boxes(table), ids, mode=cfg.gate.mode,
                                                       low=gate["low"], high=gate["high"], **kw)["map"]}
    write_submissions(run, boxes, gated, pool_probs, out_dir)
    result = {"mode": cfg.gate.mode, "low": gate["low"], "high": gate["high"], "tuned": gate.get("tuned", False),
              **scores}
    write_json(out_dir / "gate.json", result)
    return result


def tune_or_fixed_gate(run: Run, cls_pred: Path, det_pred: Path) -> dict:
    g = run.cfg.gate
    if not g.tune_on_oof or g.mode == "off":
        return {"low": g.low, "high": g.high}
    oof = read_table(det_pred / "oof_boxes.csv")
    best = gating.tune_gate(oof, p_abnormal(run, cls_pred), det.training_boxes(run.table), run.det_labeled_ids,
                            class_names=list(run.table.box_classes), iou_thr=run.cfg.detector.metric_iou,
                            mode=g.mode)
    return {"low": best.get("low", g.low), "high": best.get("high", g.high), "tuned": True}


def write_submissions(run: Run, raw: pd.DataFrame, gated: pd.DataFrame, pool_probs: pd.DataFrame, out_dir: Path) -> None:
    """Competition CSVs for the test role (or the unlabeled pool when there is no test role)."""
    items = run.table.with_role("test")
    if items.empty:
        items = run.table.with_role("unlabeled")
    nf = len(run.table.box_classes)
    for tag, boxes in (("raw", raw), ("gated", gated)):
        if run.cfg.data.format == "siim":
            sub = gating.siim_submission(boxes, pool_probs, items, study_classes=run.table.study_classes,
                                         no_finding_class=nf)
        else:
            sub = gating.vinbigdata_submission(boxes, items, no_finding_class=nf)
        write_table(out_dir / f"submission_{tag}.csv", sub)


# ------------------------------------------------------------------------------- oracle


def truth_table(run: Run) -> ItemTable:
    """The run's table with the hidden truth of the unlabeled pool filled in (oracle only)."""
    truth_items = run.truth.items.set_index("image_id")
    items = run.table.items.copy()
    pool = items["role"].eq("unlabeled") & items["image_id"].isin(truth_items.index)
    cols = [*run.table.label_columns, "has_study_label", "box_labeled"]
    items.loc[pool, cols] = truth_items.loc[items.loc[pool, "image_id"], cols].to_numpy()
    items[["has_study_label", "box_labeled"]] = items[["has_study_label", "box_labeled"]].astype(bool)
    truth_boxes = det.training_boxes(run.truth)
    boxes = pd.concat([run.table.boxes, truth_boxes[truth_boxes["image_id"].isin(set(items.loc[pool, "image_id"]))]],
                      ignore_index=True)
    return run.table.replace(items=items, boxes=boxes)


def oracle(run: Run, with_detector: bool) -> dict | None:
    """The cycle-0 recipe trained on every label (labeled + the pool's hidden truth): the ceiling
    that the fraction of the gap closed is read against."""
    if run.truth is None or not run.cfg.run.oracle:
        return None
    table = truth_table(run)
    extra = tuple(table.items.loc[table.items["role"].eq("unlabeled") & table.items["has_study_label"], "image_id"])
    pred = classifier_generation(run, 0, None, None, name="oracle", table=table, extra_ids=extra)
    out = {"model": run.cfg.classifier.ladder[0], "classifier": classifier_metrics(run, pred)}
    if with_detector:
        boxed = tuple(table.items.loc[table.items["role"].eq("unlabeled") & table.items["box_labeled"], "image_id"])
        out["detector"] = detector_metrics(run, detector_generation(run, 0, None, name="oracle", table=table,
                                                                    extra_ids=boxed))
    return out


def gap_closed(gens: list[dict], oracle_rec: dict | None) -> dict:
    """(last student - teacher) / (oracle - teacher) on the held-out test part."""
    if not oracle_rec or len(gens) < 2:
        return {}
    out = {}
    for key, path in (("classifier_auc", ("classifier", "test", "auc_macro")), ("detector_map", ("detector", "test", "map"))):
        vals = [_dig(gens[0], path), _dig(gens[-1], path), _dig(oracle_rec, path)]
        if None not in vals and abs(vals[2] - vals[0]) > 1e-9:
            out[key] = (vals[1] - vals[0]) / (vals[2] - vals[0])
    return out


def _dig(d, path):
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


# ------------------------------------------------------------------------------ the loop


def generation_record(run: Run, gen: int, cls_pred: Path, det_pred: Path | None) -> dict:
    rec = {"generation": gen, "model": cls.ladder_value(run.cfg.classifier.ladder, gen),
           "classifier": classifier_metrics(run, cls_pred)}
    if det_pred is not None:
        rec["detector_model"] = cls.ladder_value(run.cfg.detector.ladder, gen)
        rec["detector"] = detector_metrics(run, det_pred)
    return rec


def run_cycles(cfg: EngineConfig) -> dict:
    """Run data preparation, generation 0 and ``cfg.run.cycles`` teacher -> student cycles."""
    started = time.perf_counter()
    run = prepare(cfg)
    with_det = detection_enabled(run)
    cls_pred = classifier_generation(run, 0, None, None)
    det_pred = detector_generation(run, 0, None) if with_det else None
    gens, cycles = [generation_record(run, 0, cls_pred, det_pred)], []
    for cycle in range(1, cfg.run.cycles + 1):
        cycle_dir = run.out / f"cycle{cycle}"
        payload = {"teacher": file_digest(cls_pred), "detector": file_digest(det_pred) if det_pred else None,
                   "pseudo": config_to_dict(cfg.pseudo), "det": config_to_dict(cfg.detector), "seed": cfg.run.seed}

        def select(d: Path, c=cls_pred, b=det_pred, k=cycle) -> dict:
            rec = {"classifier": select_classifier_pseudo(run, c, d, k)}
            if b is not None:
                rec["detector"] = select_detector_pseudo(run, b, c, d, k)
            return rec

        rec = run.stage(cycle_dir, "pseudo", payload, select)
        prev = cls_pred
        cls_pred = classifier_generation(run, cycle, cycle_dir / "pseudo", prev)
        det_pred = detector_generation(run, cycle, cycle_dir / "pseudo") if with_det else None
        gens.append(generation_record(run, cycle, cls_pred, det_pred))
        cycles.append({"cycle": cycle, "pseudo": rec["result"], "teacher": gens[cycle - 1]["generation"],
                       "student": cycle})
    payload = {"cls": file_digest(cls_pred), "det": file_digest(det_pred) if det_pred else None,
               "gate": config_to_dict(cfg.gate)}
    final = run.stage(run.out, "final", payload, lambda d: final_stage(run, cls_pred, det_pred, d))
    oracle_rec = oracle(run, with_det)
    summary = {"generations": gens, "cycles": cycles, "oracle": oracle_rec, "gap_closed": gap_closed(gens, oracle_rec),
               "gate": final["result"] or None, "data": read_json(run.out / "data.done.json")["result"],
               "stages": [{k: r[k] for k in ("path", "seconds", "skipped")} for r in run.records],
               "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(run.out / "summary.json", summary)
    write_reports(run, cfg.run.cycles)
    return summary


def write_reports(run: Run, cycles: int) -> None:
    """Per-cycle pseudo-label quality reports and the index. A report that fails is logged, not
    fatal: the run's results are already on disk and a report can be rebuilt from them."""
    from ..teacher_student.report import write_cycle_report, write_index

    load = run.load_for({"preprocess": config_to_dict(run.cfg.preprocess)})
    for cycle in range(1, cycles + 1):
        try:
            path = write_cycle_report(run.out, cycle, load=load)
            log.info("report %s", path)
        except Exception as err:  # noqa: BLE001 - reports must never lose a finished run
            log.error("cycle %d report failed: %s: %s", cycle, type(err).__name__, err)
    write_index(run.out)
