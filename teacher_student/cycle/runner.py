"""The cycle runner: data -> generation 0 (teachers) -> for each cycle: pseudo labels -> student.

Every step is a resumable stage whose fingerprint covers the config slice and the inputs that made
it (file digests of the previous stage's outputs), so rerunning the same command after a kill skips
what is done and redoes only what was cut short; changing a setting redoes exactly the stages it
affects. Paths: ``teacher_student.layout.RunLayout``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ...datasets.atomic import read_json, write_json
from ...datasets.config import config_to_dict
from ...loops.crossfit import StageSpec
from ...loops.executor import Executor, make_executor
from ...loops.stages import file_digest, hold_lock
from ..config import EngineConfig, RunConfig, ladder_value
from ..context import RunContext
from ..layout import CLASSIFIER, DETECTOR, SEGMENTER, RunLayout
from ..tasks.base import Task
from ..tasks.registry import TASK_KINDS
from .data_stage import claim_run_folder, prepare
from .cascade import cascade_stage
from .final_stage import final_stage
from .generation import generation_fit, train_fits
from .references import gains, references
from .selection import select_stage

log = logging.getLogger("cxr.cycle")


def run_cycles(cfg: EngineConfig) -> dict:
    """Run data preparation, generation 0 and ``cfg.run.cycles`` teacher -> student cycles, the
    independent folds of each step on the configured executor (``run.executor``), holding the run
    folder's lock throughout (one run per folder: a second one is refused with one line)."""
    layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
    claim_run_folder(layout)
    with hold_lock(layout.lock, what=f"run.out {layout.root}"):
        executor = run_executor(cfg.run)
        try:
            return _run_cycles(cfg, executor)
        finally:
            executor.close()


def run_executor(run: RunConfig) -> Executor:
    return make_executor(run.executor, workers=run.fold_workers, ray_address=run.ray_address,
                         ray_num_cpus=run.ray_num_cpus_per_fold, ray_num_gpus=run.ray_num_gpus_per_fold)


def run_tasks(ctx: RunContext) -> list[Task]:
    """The run's task kinds (run.tasks) that have labels in its data."""
    return [task for task in (TASK_KINDS[name](ctx) for name in ctx.cfg.run.tasks) if task.enabled()]


def _run_cycles(cfg: EngineConfig, executor: Executor) -> dict:
    started = time.perf_counter()
    if cfg.run.tensorboard:
        from ...loops.tensorboard import require_tensorboard

        require_tensorboard()
    ctx = prepare(cfg, executor)
    tasks = run_tasks(ctx)
    detector = next((t for t in tasks if t.name == DETECTOR), None)
    preds = train_fits(ctx, [generation_fit(ctx, t, 0) for t in tasks])
    gens, cycles = [generation_record(ctx, tasks, 0, preds)], []
    for cycle in range(1, cfg.run.cycles + 1):
        rec = select_stage(ctx, tasks, preds, cycle)
        write_reports(ctx, [cycle], "first look: its student is training next; refreshed when the run ends")
        preds = train_fits(ctx, [generation_fit(ctx, t, cycle) for t in tasks])
        gens.append(generation_record(ctx, tasks, cycle, preds))
        cycles.append({"cycle": cycle, "pseudo": rec["result"], "teacher": gens[cycle - 1]["generation"],
                       "student": cycle})
    final = ctx.stage(*final_spec(ctx, detector, preds)) if CLASSIFIER in preds else {"result": None}
    masks = next((t for t in tasks if t.name == SEGMENTER), None)
    cascade = cascade_stage(ctx, masks, preds) if masks else None
    ablation_rec, oracle_rec = references(ctx, tasks, cfg.run.cycles)
    summary = {"generations": gens, "cycles": cycles, "ablation": ablation_rec, "oracle": oracle_rec,
               "gains": gains(gens, ablation_rec, oracle_rec), "cascade": cascade,
               "gate": final["result"] or None, "data": read_json(ctx.layout.marker(ctx.layout.data))["result"],
               "stages": [{k: r[k] for k in ("path", "seconds", "skipped")} for r in ctx.records],
               "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(ctx.layout.summary, summary)
    write_reports(ctx, list(range(1, cfg.run.cycles + 1)))
    return summary


def final_spec(ctx: RunContext, detector: Task | None, preds: dict[str, Path]) -> StageSpec:
    """The final stage (gate, gated predictions, submissions) of the last generation's predictions."""
    payload = {"cls": file_digest(preds[CLASSIFIER]), "det": file_digest(preds[DETECTOR]) if detector else None,
               "gate": config_to_dict(ctx.cfg.gate)}
    return ctx.layout.final, payload, lambda d: final_stage(ctx, detector, preds[CLASSIFIER], preds.get(DETECTOR), d)


def generation_record(ctx: RunContext, tasks: list[Task], gen: int, preds: dict[str, Path]) -> dict:
    """The generation's scores, also written to ``gen<g>/metrics.json`` at once: the report of a
    cycle written while the run goes on reads them there (summary.json comes only at the end)."""
    rec = {"generation": gen, "model": ladder_value(ctx.cfg.classifier.ladder, gen)}
    for task in tasks:
        if task.name != CLASSIFIER:
            rec[f"{task.name}_model"] = task.model_name(gen)
        rec[task.name] = task.score(preds[task.name])
    write_json(ctx.layout.metrics(gen), rec)
    return rec


def write_reports(ctx: RunContext, cycles: list[int], note: str | None = None) -> None:
    """Per-cycle pseudo-label quality reports and the index, as soon as a cycle's pseudo labels
    exist (so cycle 1 can be read while cycle 2 trains) and again at the end, when every number is
    in. A report that fails is logged, not fatal: the run's results are on disk and a report can
    be rebuilt from them."""
    from ..report import write_cycle_report, write_index
    from ..report.masks import write_mask_report

    load = ctx.loader()
    for cycle in cycles:
        try:
            if CLASSIFIER in ctx.cfg.run.tasks:
                path = write_cycle_report(ctx.layout.root, cycle, load=load, status=note)
            else:
                path = write_mask_report(ctx.layout.root, cycle, load=load)
            log.info("report %s", path)
        except Exception as err:  # noqa: BLE001 - reports must never lose a finished run
            log.error("cycle %d report failed: %s: %s", cycle, type(err).__name__, err)
    try:
        write_index(ctx.layout.root)
    except Exception as err:  # noqa: BLE001
        log.error("index failed: %s: %s", type(err).__name__, err)
