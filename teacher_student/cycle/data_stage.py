"""The data stage: load and validate the data, build the preprocessing cache, assign leak-free folds.

Its outputs (``<out>/data/``) are the item table every later stage reads, the quarantine of
everything rejected, the folds (grouped by patient and by duplicate image) and, for datasets that
have it, the hidden truth of the pool -- kept apart so that only evaluation reads it.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ...datasets.adapters import load_dataset, load_hidden_truth
from ...datasets.atomic import atomic_path, read_json, read_table, write_json, write_table
from ...datasets.cache import ImageCache
from ...datasets.config import config_to_dict, fingerprint
from ...datasets.errors import ConfigError, DataError
from ...datasets.mask_cache import MaskCache
from ...datasets.folds import assign_folds, check_no_leak, hold_out_groups
from ...datasets.grades import GRADE, with_grades
from ...datasets.table import ItemTable, Quarantine, format_problem, load_table, save_table
from ...loops.device import resolve_device
from ...loops.executor import Executor, LocalExecutor
from ...loops.stages import Stage, source_digest
from ..config import EngineConfig, detector_preprocess
from ..layout import FOLD_REPORT, FOLDS, GROUPS, TABLE_META, RunLayout
from ..context import RunContext, run_stage
from ..tasks.grader import grade_source

log = logging.getLogger("cxr.cycle")


def prepare(cfg: EngineConfig, executor: Executor | None = None) -> RunContext:
    """Run (or reuse) the data stage and return the run's context, complete."""
    layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
    claim_run_folder(layout)
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
    data = config_to_dict(cfg.data)
    if not data.get("hidden_fraction"):  # added later: runs that hide nothing keep their data stage
        data.pop("hidden_fraction", None)
    payload = {"data": data, "pre": config_to_dict(cfg.preprocess),
               "folds": config_to_dict(cfg.folds), "source": source_digest(Path(cfg.data.root))}
    grades = [grade_source(cfg), grade_source(cfg, hidden=True)]
    if grades[0] is not None:  # only then: runs without a grader keep their data stage
        payload["grades"] = [config_to_dict(s) if s else None for s in grades]
    return payload


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
    duplicates = read_json(layout.data / FOLD_REPORT).get("test_duplicates_of_training", [])
    unscored = frozenset(duplicates) if cfg.folds.test_duplicates == "exclude" else frozenset()
    return RunContext(cfg, layout, table, truth, folds, device, records if records is not None else [],
                      unscored_test=unscored, executor=executor or LocalExecutor())


def claim_run_folder(layout: RunLayout) -> None:
    """Make ``run.out`` a run folder of this engine, or refuse with one line.

    A run writes and replaces whole folders in it (``data/``, ``final/``, ``gen<g>/``...), so it
    may only write into a new or empty folder, or one that is already a run of this engine (it
    holds the marker file, or a data stage of a run made before the marker existed): never into a
    folder of the user's own files.
    """
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"run.out {root}: is a file, not a folder")
    if layout.run_marker.is_file():
        return
    if root.is_dir() and any(root.iterdir()) and not layout.is_run():
        raise ConfigError(f"run.out {root}: the folder is not empty and is not a run of this engine (no "
                          f"{layout.run_marker.name}): choose a new or empty folder, since a run replaces data/, "
                          "final/ and the other folders it writes")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.out {root}: cannot create the folder ({err.strerror or err})") from None
    write_json(layout.run_marker, {"engine": "cxr-noisy-student", "claimed": time.strftime("%Y-%m-%dT%H:%M:%S")})


def make_demo(cfg: EngineConfig, root: Path) -> None:
    """Generate (or reuse) the built-in demo in its layout (``data.demo_layout``)."""
    from ...datasets.demo import make_demo_dataset
    from ...datasets.demo_siim import make_siim_demo

    labeled, unlabeled, test = cfg.data.demo_counts
    make = make_siim_demo if cfg.data.demo_layout == "siim" else make_demo_dataset
    make(root, seed=cfg.data.demo_seed, n_labeled=labeled, n_unlabeled=unlabeled, n_test=test,
         size=cfg.data.demo_image_size)


def build_data(cfg: EngineConfig, layout: RunLayout, stage_dir: Path) -> dict:
    table = load_dataset(cfg.data)
    grades = grade_source(cfg)
    if grades is not None:
        table = with_grades(table, Path(cfg.data.root), grades, cfg.data.on_bad_input)
    cache = ImageCache(layout.cache, cfg.preprocess)
    failures = cache.build(table.items[["image_id", "path"]], workers=cfg.run.workers)
    if cfg.detector.enabled and detector_preprocess(cfg) != cfg.preprocess:  # the detectors' own input size
        more = ImageCache(layout.cache, detector_preprocess(cfg)).build(table.items[["image_id", "path"]],
                                                                        workers=cfg.run.workers)
        failures = pd.concat([failures, more[~more["image_id"].isin(set(failures["image_id"]))]], ignore_index=True)
    if cfg.data.on_bad_input == "error" and len(failures):  # decoding found what headers could not
        bad = failures.iloc[0]
        Quarantine("error").reject(bad["path"], None, bad["image_id"], bad["problem"])
    table = drop_unreadable(table, failures)
    check_enough_left(table)
    if "classifier" in cfg.run.tasks:
        check_study_labels(table)
    table = cache_masks(cfg, layout, table)
    if cfg.data.test_fraction > 0:
        table = hold_out_test(cfg, table, cache.hashes())
    hidden = None
    if cfg.data.hidden_fraction > 0:
        table, hidden = hide_labels(cfg, table, cache.hashes())
    fa = assign_folds(table.items, cache.hashes(), k=cfg.folds.k, seed=cfg.folds.seed,
                      phash_max_distance=cfg.folds.phash_max_distance)  # every role: duplicates across roles too
    report_test_duplicates(fa.report, cfg.folds.test_duplicates)
    report_chained_groups(fa.report)
    save_table(stage_dir, table)
    write_table(stage_dir / FOLDS, fa.folds.rename("fold").rename_axis("image_id").reset_index())
    write_table(stage_dir / GROUPS, fa.groups.rename("group").rename_axis("image_id").reset_index())
    write_json(stage_dir / FOLD_REPORT, fa.report)
    truth = load_hidden_truth(cfg.data) if cfg.data.hidden_truth else None
    hidden_grades = grade_source(cfg, hidden=True)
    if truth is not None and hidden_grades is not None:
        truth = with_grades(truth, Path(cfg.data.root), hidden_grades, cfg.data.on_bad_input)
    if hidden is not None and cfg.data.hidden_truth:
        truth = hidden if truth is None else truth.replace(
            items=pd.concat([truth.items, hidden.items], ignore_index=True),
            boxes=pd.concat([truth.boxes, hidden.boxes], ignore_index=True))
    if truth is not None:
        save_table(stage_dir / layout.truth.name, cache_masks(cfg, layout, truth))
    return {"table": table.summary(), "quarantined": int(len(table.quarantine)), "folds": fa.report}


MOST_QUARANTINED = 0.5
"""The run stops when more than this share of the images was quarantined (or no labeled image is
left): a run on what remains would say nothing, and the cause is usually one setting."""


def check_enough_left(table: ItemTable) -> None:
    """One line when most or all images were quarantined: the count and the top reasons, before
    the folds would fail with a message that names neither."""
    q = table.quarantine
    rejected = set(q["image_id"].dropna()) - set(table.items["image_id"])
    total, labeled = len(rejected) + len(table.items), len(table.with_role("labeled"))
    if labeled and len(rejected) <= MOST_QUARANTINED * total:
        return
    kinds = q["problem"].map(problem_kind).value_counts()
    reasons = "; ".join(f"{n}x {kind}" for kind, n in kinds.head(3).items())
    left = "no labeled image is left" if not labeled else f"{len(table.items)} images are left"
    raise DataError(f"data: {len(rejected)} of {total} image ids were quarantined and {left} (top reasons: {reasons}); "
                    f"first: {format_problem(q.iloc[0].to_dict())}" if len(q) else
                    f"data: no labeled image in {total} images (every image has role unlabeled or test)")


def problem_kind(problem: str) -> str:
    """A quarantine problem without its particulars (paths, quoted values, numbers), so that the
    rows of one cause count together."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(problem))
    text = re.sub(r"(?<![\w'])/\S+", "…", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)


def check_study_labels(table: ItemTable) -> None:
    """The classifier (first of run.tasks: the detector's negatives and the gate read it) needs
    labeled images of at least two study classes; one line saying what the labels hold instead."""
    labeled = table.with_role("labeled")
    labeled = labeled[labeled["has_study_label"]]
    present = [c for c, col in zip(table.study_classes, table.label_columns) if (labeled[col] >= 0.5).any()]
    if table.label_mode == "multiclass" and len(present) < 2:
        held = f"only {present[0]!r}" if present else "no study label"
        raise DataError(f"data: the {len(labeled)} labeled images with a study label hold {held}; the classifier "
                        f"needs examples of at least two of the study classes {list(table.study_classes)}")


def report_test_duplicates(report: dict, policy: str) -> None:
    found = report["test_duplicates_of_training"]
    if found:
        log.warning("%d test images duplicate a labeled (training) image (e.g. %s); folds.test_duplicates %s: %s",
                    len(found), found[0], policy,
                    "left out of every test metric" if policy == "exclude" else "still scored (report only)")


def report_chained_groups(report: dict) -> None:
    """One warning per duplicate group too large to be copies of one case (folds.chained_groups)."""
    for group in report.get("chained_groups", []):
        log.warning("folds.phash_max_distance %d ties %d images (%.0f%% of the data) into one duplicate group "
                    "through chains of similar perceptual hashes: those images are kept in one fold; if they are "
                    "not copies of one case, lower folds.phash_max_distance (0: pixel-identical images only)",
                    report["phash_max_distance"], group["images"], 100 * group["share"])


def labeled_groups(cfg: EngineConfig, table: ItemTable, hashes: pd.DataFrame, *, fraction: float, seed: int) -> set[str]:
    """Whole patient/duplicate groups of labeled images holding about ``fraction`` of the images
    data.test_from counts (all labeled, or the box- or mask-labeled ones)."""
    labeled = table.with_role("labeled")
    flag = cfg.data.test_from
    candidates = labeled[flag] if flag in ("box_labeled", "mask_labeled") else pd.Series(True, index=labeled.index)
    return set(hold_out_groups(labeled, hashes, candidates.to_numpy(), fraction=fraction, seed=seed,
                               phash_max_distance=cfg.folds.phash_max_distance))


def hold_out_test(cfg: EngineConfig, table: ItemTable, hashes: pd.DataFrame) -> ItemTable:
    """Move a patient-grouped part of the labeled images to the test role (data.test_fraction)."""
    held = labeled_groups(cfg, table, hashes, fraction=cfg.data.test_fraction, seed=cfg.folds.seed)
    items = table.items.copy()
    items.loc[items["image_id"].isin(held), "role"] = "test"
    log.info("data.test_fraction %.2f: %d labeled images (whole patient/duplicate groups) held out as test",
             cfg.data.test_fraction, len(held))
    return table.replace(items=items)


def hide_labels(cfg: EngineConfig, table: ItemTable, hashes: pd.DataFrame) -> tuple[ItemTable, ItemTable]:
    """(the table with a patient-grouped part of the labeled images made unlabeled -- every label
    of theirs removed: study label, boxes, mask, grade --, those images' labels as hidden truth).

    data.hidden_fraction: what a semi-supervised paper does to a fully labeled set, so that the
    oracle and pseudo-label quality have truth. The truth goes where the demo's does (``truth/``),
    read only by the references and by evaluation; training sees the images as unlabeled."""
    held = labeled_groups(cfg, table, hashes, fraction=cfg.data.hidden_fraction, seed=cfg.folds.seed + 1)
    items, hidden = table.items.copy(), table.items["image_id"].isin(held)
    truth = table.replace(items=items[hidden].assign(role="unlabeled").reset_index(drop=True),
                          boxes=table.boxes[table.boxes["image_id"].isin(held)].reset_index(drop=True))
    blank = {"role": "unlabeled", "has_study_label": False, "box_labeled": False, "mask_labeled": False,
             "mask_path": "", "mask_rle": "", "mask_instances": 0}
    for column, value in blank.items():
        if column in items:
            items.loc[hidden, column] = value
    items.loc[hidden, [c for c in (*table.label_columns, GRADE) if c in items]] = np.nan
    log.info("data.hidden_fraction %.2f: the labels of %d labeled images (whole patient/duplicate groups) are hidden: "
             "they are unlabeled for training, %s", cfg.data.hidden_fraction, len(held),
             "their labels the pool's hidden truth (oracle, pseudo-label quality)" if cfg.data.hidden_truth
             else "their labels unused (data.hidden_truth is off)")
    return table.replace(items=items, boxes=table.boxes[~table.boxes["image_id"].isin(held)].reset_index(drop=True)), truth


def cache_masks(cfg: EngineConfig, layout: RunLayout, table: ItemTable) -> ItemTable:
    """Build the mask cache at the run's size; a mask that fails now (changed since it was checked)
    is quarantined and its image is no longer mask-labeled."""
    if "mask_labeled" not in table.items or not table.items["mask_labeled"].any():
        return table
    failures = MaskCache(layout.cache, cfg.preprocess.size).build(table.items)
    if failures.empty:
        return table
    if cfg.data.on_bad_input == "error":
        bad = failures.iloc[0]
        Quarantine("error").reject(bad["path"], None, bad["image_id"], bad["problem"])
    items = table.items.copy()
    items.loc[items["image_id"].isin(set(failures["image_id"])), "mask_labeled"] = False
    rows = pd.DataFrame({"file": failures["path"], "row": None, "image_id": failures["image_id"],
                         "problem": failures["problem"]})
    return table.replace(items=items, quarantine=pd.concat([table.quarantine, rows], ignore_index=True))


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
                    "; ".join(format_problem(r) for r in q.head(3).to_dict("records")))
