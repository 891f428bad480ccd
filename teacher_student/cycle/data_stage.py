"""The data stage: load and validate the data, build the preprocessing cache, assign leak-free folds.

Its outputs (``<out>/data/``) are the item table every later stage reads, the quarantine of
everything rejected, the folds (grouped by patient and by duplicate image) and, for datasets that
have it, the hidden truth of the pool -- kept apart so that only evaluation reads it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml

from ...datasets.adapters import load_dataset, load_hidden_truth
from ...datasets.atomic import atomic_path, read_table, write_json, write_table
from ...datasets.cache import ImageCache
from ...datasets.config import config_to_dict, fingerprint
from ...datasets.errors import DataError
from ...datasets.folds import assign_folds, check_no_leak, hold_out_groups
from ...datasets.table import ItemTable, Quarantine, load_table, save_table
from ...loops.device import resolve_device
from ...loops.executor import Executor, LocalExecutor
from ...loops.stages import Stage, source_digest
from ..config import EngineConfig
from ..layout import FOLD_REPORT, FOLDS, GROUPS, TABLE_META, RunLayout
from ..context import RunContext, run_stage

log = logging.getLogger("cxr.cycle")


def prepare(cfg: EngineConfig, executor: Executor | None = None) -> RunContext:
    """Run (or reuse) the data stage and return the run's context, complete."""
    layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.config) as tmp:
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    root = Path(cfg.data.root)
    if cfg.data.format == "demo":
        make_demo(cfg, root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist (set --data or data.root)")
    records: list = []
    run_stage(layout, records, layout.data, data_payload(cfg), lambda d: build_data(cfg, layout, d))
    return load_context(cfg, layout, records, executor)


def data_payload(cfg: EngineConfig) -> dict:
    """What the data stage's outputs depend on: data, preprocessing and fold settings, the source files."""
    return {"data": config_to_dict(cfg.data), "pre": config_to_dict(cfg.preprocess),
            "folds": config_to_dict(cfg.folds), "source": source_digest(Path(cfg.data.root))}


def data_done(cfg: EngineConfig, layout: RunLayout) -> bool:
    """Whether the data stage is done for this config (read only: nothing is generated or written)."""
    if not Path(cfg.data.root).is_dir():
        return False
    return Stage(layout.data.parent, layout.data.name, fingerprint(data_payload(cfg))).is_done()


def load_context(cfg: EngineConfig, layout: RunLayout, records: list | None = None,
                 executor: Executor | None = None) -> RunContext:
    """The run's context from a finished data stage (reads only)."""
    device = resolve_device(cfg.run.device)
    table = load_table(layout.data)
    truth = load_table(layout.truth) if (layout.truth / TABLE_META).exists() else None
    folds = read_table(layout.data / FOLDS).set_index("image_id")["fold"]
    groups = read_table(layout.data / GROUPS).set_index("image_id")["group"]
    check_no_leak(folds, groups)  # run-time guard: no patient or duplicate group straddles folds
    report_quarantine(table)
    return RunContext(cfg, layout, table, truth, folds, device, records if records is not None else [],
                      executor or LocalExecutor())


def make_demo(cfg: EngineConfig, root: Path) -> None:
    from ...datasets.demo import make_demo_dataset

    if len(cfg.data.demo_counts) != 3:
        raise DataError("data.demo_counts: give three numbers: labeled, unlabeled, test")
    labeled, unlabeled, test = cfg.data.demo_counts
    make_demo_dataset(root, seed=cfg.data.demo_seed, n_labeled=labeled, n_unlabeled=unlabeled, n_test=test,
                      size=cfg.data.demo_image_size)


def build_data(cfg: EngineConfig, layout: RunLayout, stage_dir: Path) -> dict:
    table = load_dataset(cfg.data)
    cache = ImageCache(layout.cache, cfg.preprocess)
    failures = cache.build(table.items[["image_id", "path"]], workers=cfg.run.workers)
    if cfg.data.on_bad_input == "error" and len(failures):  # decoding found what headers could not
        bad = failures.iloc[0]
        Quarantine("error").reject(bad["path"], None, bad["image_id"], bad["problem"])
    table = drop_unreadable(table, failures)
    if cfg.data.test_fraction > 0:
        table = hold_out_test(cfg, table, cache.hashes())
    fa = assign_folds(table.with_role("labeled"), cache.hashes(), k=cfg.folds.k, seed=cfg.folds.seed,
                      phash_max_distance=cfg.folds.phash_max_distance)
    save_table(stage_dir, table)
    write_table(stage_dir / FOLDS, fa.folds.rename("fold").rename_axis("image_id").reset_index())
    write_table(stage_dir / GROUPS, fa.groups.rename("group").rename_axis("image_id").reset_index())
    write_json(stage_dir / FOLD_REPORT, fa.report)
    truth = load_hidden_truth(cfg.data) if cfg.data.hidden_truth else None
    if truth is not None:
        save_table(stage_dir / layout.truth.name, truth)
    return {"table": table.summary(), "quarantined": int(len(table.quarantine)), "folds": fa.report}


def hold_out_test(cfg: EngineConfig, table: ItemTable, hashes: pd.DataFrame) -> ItemTable:
    """Move a patient-grouped part of the labeled images to the test role (data.test_fraction)."""
    labeled = table.with_role("labeled")
    candidates = labeled["box_labeled"] if cfg.data.test_from == "box_labeled" else pd.Series(True, index=labeled.index)
    held = set(hold_out_groups(labeled, hashes, candidates.to_numpy(), fraction=cfg.data.test_fraction,
                               seed=cfg.folds.seed, phash_max_distance=cfg.folds.phash_max_distance))
    items = table.items.copy()
    items.loc[items["image_id"].isin(held), "role"] = "test"
    log.info("data.test_fraction %.2f: %d labeled images (whole patient/duplicate groups) held out as test",
             cfg.data.test_fraction, len(held))
    return table.replace(items=items)


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
