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

from datasets.table import DataError, ItemTable, load_table, save_table
from loops.stages import Stage, read_json, read_table, write_json, write_table
from teacher_student import classification as cls
from teacher_student import pseudo
from teacher_student.config import EngineConfig, config_to_dict, fingerprint

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

    def ids(self, *roles: str) -> list[str]:
        return self.table.with_role(*roles)["image_id"].tolist()


# ---------------------------------------------------------------------------------- data


def prepare(cfg: EngineConfig) -> Run:
    """Load and validate the data, build the preprocessing cache, assign leak-free folds."""
    from datasets.adapters import load_dataset, load_hidden_truth
    from datasets.cache import ImageCache
    from datasets.folds import assign_folds, check_no_leak

    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    root = Path(cfg.data.root)
    if cfg.data.format == "demo":
        from datasets.demo import make_demo_dataset

        make_demo_dataset(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (set --data or data.root)")
    cache = ImageCache(Path(cfg.run.cache_dir or out / "cache"), cfg.preprocess)

    def build(stage_dir: Path) -> dict:
        table = load_dataset(cfg.data)
        failures = cache.build(table.items[["image_id", "path"]], workers=cfg.run.workers)
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
    from loops.checkpoint import preprocess_from_meta

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


def classifier_generation(run: Run, gen: int, pseudo_dir: Path | None, prev_pred: Path | None) -> Path:
    """Train generation ``gen``'s k fold classifiers and write its predictions; return their dir."""
    cfg, gen_dir = run.cfg, run.out / f"gen{gen}" / "classifier"
    oof = read_table(prev_pred / "oof.csv") if prev_pred else None
    pool = read_table(prev_pred / "pool.csv") if prev_pred else None
    selected = read_table(pseudo_dir / "class_pseudo.csv") if pseudo_dir else None
    base = {"classifier": config_to_dict(cfg.classifier), "augment": config_to_dict(cfg.augment),
            "pre": config_to_dict(cfg.preprocess), "pseudo": config_to_dict(cfg.pseudo), "seed": cfg.run.seed,
            "gen": gen}
    for fold in range(cfg.folds.k):
        train_ids = [i for i in run.labeled_ids if run.folds[i] != fold]
        val_ids = [i for i in run.labeled_ids if run.folds[i] == fold]
        ts = cls.student_targets(cfg, run.table, train_ids, oof, selected, pool)
        payload = {**base, "fold": fold, "train": fingerprint(ts.fingerprint_payload()), "val": val_ids}
        run.stage(gen_dir, f"fold{fold}", payload,
                  lambda d, f=fold, t=ts, v=val_ids: cls.train_fold(cfg, run.table, run.load_for({"preprocess": config_to_dict(cfg.preprocess)}),
                                                                  gen, f, t, v, run.device, d, log.info))
    pool_ids = run.ids("unlabeled", "test")
    payload = {**base, "models": file_digest(*(gen_dir / f"fold{f}" for f in range(cfg.folds.k))), "pool": pool_ids}
    run.stage(gen_dir, "predictions", payload,
              lambda d: cls.predict_generation(cfg, run.table, run.load_for, run.folds, gen_dir, pool_ids,
                                               run.device, d))
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


def select_classifier_pseudo(run: Run, pred_dir: Path, out_dir: Path) -> dict:
    """Confidence filter + class balancing of the teacher's unlabeled-pool probabilities."""
    cfg, table = run.cfg, run.table
    preds = cls.load_predictions(pred_dir)
    cols = cls.prob_columns(table.study_classes)
    oof = preds["oof"]
    thresholds = None
    if cfg.pseudo.target_precision > 0:
        thresholds = pseudo.class_thresholds(oof[cols].to_numpy(), table.study_targets(oof["image_id"]),
                                             target_precision=cfg.pseudo.target_precision, mode=table.label_mode)
    unlabeled = preds["pool"][preds["pool"]["image_id"].isin(run.ids("unlabeled"))]
    selection = pseudo.select_pseudo(unlabeled["image_id"].tolist(), unlabeled[cols].to_numpy(), mode=table.label_mode,
                                     class_names=list(table.study_classes), confidence=cfg.pseudo.confidence,
                                     thresholds=thresholds)
    balanced = (pseudo.balance_classes(selection, per_class=cfg.pseudo.per_class, seed=cfg.run.seed)
                if cfg.pseudo.balance else selection[selection["kept"]].assign(copies=1))
    write_table(out_dir / "class_selection.csv", selection)
    write_table(out_dir / "class_pseudo.csv", balanced)
    info = {"unlabeled": len(selection), "kept": int(selection["kept"].sum()),
            "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
            "kept_per_class": selection[selection["kept"]]["label"].value_counts().to_dict(),
            "thresholds": None if thresholds is None else dict(zip(table.study_classes, thresholds.tolist()))}
    info["precision"] = pseudo_precision(run, selection)
    write_json(out_dir / "class_pseudo.json", info)
    return info


def pseudo_precision(run: Run, selection: pd.DataFrame) -> float | None:
    """Share of kept pseudo labels that agree with the hidden truth (demo), None without truth."""
    if run.truth is None or table_mode(run) != "multiclass":
        return None
    kept = selection[selection["kept"]]
    known = run.truth.items.set_index("image_id")
    kept = kept[kept["image_id"].map(lambda i: i in known.index and bool(known.loc[i, "has_study_label"]))]
    if kept.empty:
        return None
    truth = run.truth.study_targets(kept["image_id"]).argmax(axis=1)
    return float((truth == kept["class_index"].to_numpy()).mean())


def table_mode(run: Run) -> str:
    return run.table.label_mode


# ------------------------------------------------------------------------------ the loop


def run_cycles(cfg: EngineConfig) -> dict:
    """Run data preparation, generation 0 and ``cfg.run.cycles`` teacher -> student cycles."""
    started = time.perf_counter()
    run = prepare(cfg)
    gens: list[dict] = []
    cycles: list[dict] = []
    pred = classifier_generation(run, 0, None, None)
    gens.append({"generation": 0, "model": cfg.classifier.ladder[0], "classifier": classifier_metrics(run, pred)})
    for cycle in range(1, cfg.run.cycles + 1):
        cycle_dir = run.out / f"cycle{cycle}"
        payload = {"teacher": file_digest(pred), "pseudo": config_to_dict(cfg.pseudo), "seed": cfg.run.seed}
        rec = run.stage(cycle_dir, "pseudo", payload, lambda d, p=pred: {"classifier": select_classifier_pseudo(run, p, d)})
        prev = pred
        pred = classifier_generation(run, cycle, cycle_dir / "pseudo", prev)
        gens.append({"generation": cycle, "model": cls.ladder_value(cfg.classifier.ladder, cycle),
                     "classifier": classifier_metrics(run, pred)})
        cycles.append({"cycle": cycle, "teacher": gens[cycle - 1], "student": gens[cycle],
                       "pseudo": rec["result"]})
    summary = {"generations": gens, "cycles": cycles, "data": read_json(run.out / "data.done.json")["result"],
               "stages": [{k: r[k] for k in ("path", "seconds", "skipped")} for r in run.records],
               "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(run.out / "summary.json", summary)
    return summary
