"""The stage graph of a run: every stage a config makes, what it reads, and whether it is done.

Why: a cycle is a sequence of resumable stages whose fingerprints already say whether each is
done, so any one of them can be run on its own against an existing run folder, in any process on
any machine that sees the folder. ``run_cycle.py plan`` lists them (stage, wave, status, inputs,
outputs); ``run_cycle.py run --only gen1/classifier/fold3`` runs one (or every stage matching a
pattern) and refuses, in one line, a stage whose inputs are not done. A scheduler the user already
has (Slurm array jobs, one per wave: README) then runs a cycle's independent folds side by side,
and nothing is scheduled here.

Stages are built by the same functions the runner uses (``generation.CrossFit``,
``selection.select_spec``, ``runner.final_spec``, ``cascade.cascade_spec``), so a stage run alone
has exactly the fingerprint the whole run gives it, and a later plain run reuses it.

Statuses: ``done`` (outputs there, made by this config and these inputs), ``ready`` (inputs done,
the stage not yet), ``stale`` (inputs done, outputs made by another config or other inputs: it
will be redone), ``waiting`` (an input is not done).
"""
from __future__ import annotations

import fnmatch
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...datasets.config import fingerprint
from ...datasets.errors import ConfigError, DataError
from ...loops import distributed
from ...loops.executor import Executor, StageJob
from ...loops.stages import Stage
from ..config import EngineConfig
from ..context import RunContext, keep_record
from ..layout import CLASSIFIER, DETECTOR, SEGMENTER, RunLayout
from .cascade import cascade_spec
from .data_stage import data_done, load_context, prepare
from .generation import CrossFit, generation_fit
from .references import ABLATION, ORACLE, ablation_fits, oracle_fits
from .runner import final_spec, run_tasks
from .selection import select_spec

log = logging.getLogger("cxr.cycle")

DATA = "data"


@dataclass(frozen=True)
class Node:
    """One stage of the graph: its path in the run folder (also its name), what it reads."""

    path: str
    kind: str
    """data, fold, predictions, pseudo, final or cascade."""
    inputs: tuple[str, ...]
    wave: int
    """1 + the highest wave of its inputs (data: 0): stages of one wave never read each other."""
    fit: str = ""
    """The cross-fit a fold or predictions stage belongs to (``gen1/classifier``)."""
    fold: int = -1


class StageGraph:
    """The stages of one config. With ``ctx`` (the data stage done) it is exact: the task kinds the
    data has labels for, the oracle only when the data has hidden truth; without, it is the graph
    the config asks for."""

    def __init__(self, cfg: EngineConfig, ctx: RunContext | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
        self._fits: dict[str, CrossFit] = {}
        self._jobs: dict = {}
        self._status: dict[str, str] = {}
        self.nodes: list[Node] = []
        self._by_path: dict[str, Node] = {}
        self._build()

    # ------------------------------------------------------------------ structure
    def _add(self, path: str, kind: str, inputs: list[str], **kw) -> str:
        wave = 1 + max((self._by_path[i].wave for i in inputs), default=-1)
        node = Node(path, kind, tuple(inputs), wave, **kw)
        self.nodes.append(node)
        self._by_path[path] = node
        return path

    def _add_fit(self, fit_path: str, inputs: list[str]) -> str:
        folds = [self._add(f"{fit_path}/fold{k}", "fold", inputs, fit=fit_path, fold=k) for k in range(self.cfg.folds.k)]
        return self._add(f"{fit_path}/predictions", "predictions", folds, fit=fit_path)

    def task_names(self) -> list[str]:
        if self.ctx is None:
            return list(self.cfg.run.tasks)
        return [t.name for t in run_tasks(self.ctx)]

    def has_oracle(self) -> bool:
        if not self.cfg.run.oracle:
            return False
        return self.cfg.data.hidden_truth if self.ctx is None else self.ctx.truth is not None

    def _build(self) -> None:
        cfg, tasks = self.cfg, self.task_names()
        self._add(DATA, "data", [])
        preds = {t: self._add_fit(f"gen0/{t}", [DATA]) for t in tasks}
        for cycle in range(1, cfg.run.cycles + 1):
            pseudo = self._add(f"cycle{cycle}/pseudo", "pseudo", [preds[t] for t in tasks])
            preds = {t: self._add_fit(f"gen{cycle}/{t}", [pseudo, preds[t]]) for t in tasks}
        if CLASSIFIER in tasks:  # the runner's final stage gates with the classifier
            self._add("final", "final", [preds[t] for t in tasks])
        if SEGMENTER in tasks:
            self._add("cascade", "cascade", [preds[t] for t in (SEGMENTER, CLASSIFIER) if t in tasks])
        references = ([ABLATION] if cfg.run.ablation and cfg.run.cycles >= 1 else []) + ([ORACLE] if self.has_oracle() else [])
        for ref in references:
            for t in tasks:
                self._add_fit(f"{ref}/{t}", [DATA])

    def __getitem__(self, path: str) -> Node:
        return self._by_path[path]

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def match(self, patterns: list[str]) -> list[Node]:
        """The stages matching any of the patterns (a stage path, or a shell pattern: ``gen0/*/fold3``)."""
        return [n for n in self.nodes if any(fnmatch.fnmatchcase(n.path, p.strip("/")) for p in patterns)]

    # ------------------------------------------------------------------ stages
    def _context(self) -> RunContext:
        if self.ctx is None:
            raise DataError("the data stage is not done: run it first (run_cycle.py run --only data)")
        return self.ctx

    def cross_fit(self, fit_path: str) -> CrossFit:
        """The cross-fit behind ``gen<g>/<task>``, ``ablation/<task>`` or ``oracle/<task>``."""
        if fit_path not in self._fits:
            ctx = self._context()
            head, task_name = fit_path.split("/")
            tasks = {t.name: t for t in run_tasks(ctx)}
            if head in (ABLATION, ORACLE):
                make = ablation_fits if head == ABLATION else oracle_fits
                fits = make(ctx, list(tasks.values()), self.cfg.run.cycles)
                self._fits.update({f"{head}/{f.task.name}": f for f in fits})
            else:
                self._fits[fit_path] = generation_fit(ctx, tasks[task_name], int(head.removeprefix("gen")))
        return self._fits[fit_path]

    def _job(self, fit_path: str):
        if fit_path not in self._jobs:
            self._jobs[fit_path] = self.cross_fit(fit_path).job(self._context())
        return self._jobs[fit_path]

    def spec(self, node: Node):
        """``(stage_dir, payload, fn)`` of a stage other than data; its inputs must be done."""
        ctx = self._context()
        if node.kind == "fold":
            return self._job(node.fit).fold_stages()[node.fold]
        if node.kind == "predictions":
            return self._job(node.fit).prediction_stage(ctx.executor)
        tasks = run_tasks(ctx)
        if node.kind == "pseudo":
            cycle = int(re.fullmatch(r"cycle(\d+)/pseudo", node.path).group(1))
            return select_spec(ctx, tasks, {t.name: ctx.layout.predictions(cycle - 1, t.name) for t in tasks}, cycle)
        if node.kind == "final":
            last = self.cfg.run.cycles
            detector = next((t for t in tasks if t.name == DETECTOR), None)
            return final_spec(ctx, detector, {t.name: ctx.layout.predictions(last, t.name) for t in tasks})
        if node.kind == "cascade":
            last = self.cfg.run.cycles
            segmenter = next(t for t in tasks if t.name == SEGMENTER)
            return cascade_spec(ctx, segmenter, {t.name: ctx.layout.predictions(last, t.name) for t in tasks})
        raise ValueError(f"no stage spec for {node.kind} {node.path}")

    # ------------------------------------------------------------------ status
    def status(self, path: str) -> str:
        if path not in self._status:
            self._status[path] = self._compute_status(self[path])
        return self._status[path]

    def forget(self) -> None:
        """Forget statuses and plans (after stages ran: their outputs are other inputs now)."""
        self._status.clear()
        self._jobs.clear()

    def _compute_status(self, node: Node) -> str:
        if node.kind == "data":
            if data_done(self.cfg, self.layout):
                return "done"
            return "stale" if self.layout.marker(self.layout.data).exists() else "ready"
        if self.ctx is None or any(self.status(i) != "done" for i in node.inputs):
            return "waiting"
        try:
            stage_dir, payload, _ = self.spec(node)
        except (DataError, FileNotFoundError, KeyError) as err:  # an input folder lacks a file
            return f"waiting ({type(err).__name__})"
        stage = Stage(stage_dir.parent, stage_dir.name, fingerprint(payload))
        if stage.is_done():
            return "done"
        return "stale" if stage.marker.exists() else "ready"

    def rows(self) -> list[dict]:
        return [{"stage": n.path, "wave": n.wave, "status": self.status(n.path), "inputs": compact(n.inputs),
                 "outputs": f"{n.path}/ + {n.path}.done.json"} for n in self.nodes]


def compact(paths: tuple[str, ...]) -> str:
    """``gen0/classifier/fold0, gen0/classifier/fold1`` -> ``gen0/classifier/fold[0-1]``."""
    out, folds = [], {}
    for p in paths:
        m = re.fullmatch(r"(.*)/fold(\d+)", p)
        if m:
            folds.setdefault(m.group(1), []).append(int(m.group(2)))
        else:
            out.append(p)
    out += [f"{head}/fold[{min(ks)}-{max(ks)}]" if len(ks) > 1 else f"{head}/fold{ks[0]}" for head, ks in folds.items()]
    return ", ".join(out) or "-"


def format_plan(rows: list[dict], fmt: str) -> str:
    """The plan as an aligned table, tab-separated values (for scripts) or JSON."""
    if fmt == "json":
        import json

        return json.dumps(rows, indent=1)
    cols = ["stage", "wave", "status", "inputs", "outputs"]
    if fmt == "tsv":
        return "\n".join(["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    counts = {}
    for r in rows:
        counts[r["status"].split()[0]] = counts.get(r["status"].split()[0], 0) + 1
    return "\n".join(lines + ["", ", ".join(f"{n} {s}" for s, n in counts.items())])


def check_distributed_selection(nodes: list[Node]) -> None:
    """Under torchrun every rank trains the same fold model together: only classifier folds can."""
    wrong = [n.path for n in nodes if not (n.kind == "fold" and n.fit.endswith("/" + CLASSIFIER))]
    if wrong:
        raise ConfigError(f"under torchrun only classifier fold stages run (e.g. --only 'gen*/classifier/fold*'); "
                          f"run {wrong[0]} without torchrun")


# ---------------------------------------------------------------------------- the commands


def plan(cfg: EngineConfig) -> list[dict]:
    """``run_cycle.py plan``: every stage of the config with its status in the run folder (reads only)."""
    layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
    ctx = load_context(cfg, layout) if data_done(cfg, layout) else None
    return StageGraph(cfg, ctx).rows()


def run_only(cfg: EngineConfig, patterns: list[str], executor: Executor) -> list[dict]:
    """``run_cycle.py run --only``: run the stages matching ``patterns`` against the run folder,
    wave after wave (the folds of a wave through the executor); return their records.

    Refuses with one line, before running anything, a stage whose inputs are neither done nor
    selected. Under torchrun every rank trains the selected classifier folds together and rank 0
    writes them.

    Raises:
        DataError: no stage matches, or a stage's inputs are not done.
        ConfigError: under torchrun, a stage other than a classifier fold.
    """
    layout = RunLayout(Path(cfg.run.out), cfg.run.cache_dir)
    asked = StageGraph(cfg).match(patterns)
    if not asked:
        raise DataError(f"--only {' '.join(patterns)}: no stage of this config matches (stages look like data, "
                        "gen0/classifier/fold0, cycle1/pseudo, final; run_cycle.py plan lists them)")
    dist_run = distributed.launched_by_torchrun()
    if any(n.kind == "data" for n in asked):
        if dist_run:
            raise ConfigError("under torchrun only classifier fold stages run; run the data stage without torchrun")
        ctx = prepare(cfg, executor)
    elif not data_done(cfg, layout):
        raise DataError(f"{asked[0].path}: its inputs are not done: data (run_cycle.py run --only data first)")
    else:
        ctx = load_context(cfg, layout, executor=executor)
    graph = StageGraph(cfg, ctx)
    selected = [n for n in graph.match(patterns) if n.kind != "data"]
    for node in asked:
        if node.path not in graph:
            log.warning("%s: not a stage of this run (its task has no labels in the data, or there is no hidden "
                        "truth): nothing to do", node.path)
    if dist_run:
        check_distributed_selection(selected)
    chosen = {n.path for n in selected}
    for node in selected:
        missing = [i for i in node.inputs if i not in chosen and graph.status(i) != "done"]
        if missing:
            raise DataError(f"{node.path}: its inputs are not done: {compact(tuple(missing))} (run them first; "
                            "run_cycle.py plan shows what is done)")
    if dist_run:
        distributed.init_from_env(ctx.device)
    for wave in sorted({n.wave for n in selected}):
        graph.forget()
        nodes = [n for n in selected if n.wave == wave]
        if dist_run:
            run_ranked(ctx, graph, nodes)
            continue
        ctx.stages([graph.spec(n) for n in nodes if n.kind == "fold"])
        for node in nodes:
            if node.kind != "fold":
                ctx.stage(*graph.spec(node))
    return ctx.records


def run_ranked(ctx: RunContext, graph: StageGraph, nodes: list[Node]) -> None:
    """Classifier folds under torchrun: every rank fits (DDP inside ``loops.train.fit``); rank 0
    writes the stage, the others write into a scratch folder that is thrown away."""
    rank = distributed.world()[0]
    for node in nodes:
        stage_dir, payload, fn = graph.spec(node)
        job = StageJob(stage_dir, fingerprint(payload), fn)
        if job.stage.is_done() or rank == 0:  # every rank reads the same marker: all skip, or all fit
            keep_record(ctx.layout, ctx.records, stage_dir, job.run(), f" (torchrun, {distributed.world()[1]} processes)")
        else:
            with tempfile.TemporaryDirectory(prefix=f"rank{rank}-") as scratch:
                fn(Path(scratch))
        distributed.barrier()
