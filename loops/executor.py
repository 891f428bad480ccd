"""Where the independent pieces of one step run: in this process, in a local process pool, or as Ray tasks.

The folds of a cross-fit are independent jobs (each writes its own stage directory), so they can
run side by side on whatever the user has. This module hands them to an existing engine -- the
standard library's process pool on one machine, Ray on a cluster -- and never schedules anything
itself. Whatever runs where, a stage is still written by ``loops.stages.Stage`` (a temporary
directory swapped in whole, then the marker), so a run made by any executor, resumed by another,
is the run a local executor makes.

Workers keep one torch thread each by default (``threads``): on a small machine two folds with one
thread each use the cores better than one fold with two (small convolutions scale badly across
threads), and a fold's floating point reductions then do not depend on how busy the machine is.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import runpy
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from ..datasets.environment import entry_script
from ..datasets.errors import ConfigError
from .stages import Stage

log = logging.getLogger("cxr.cycle")

ExecutorKind = Literal["local", "processes", "ray"]


@dataclass(frozen=True)
class StageJob:
    """One resumable stage, runnable in any process: where it goes, its fingerprint, what writes it.

    ``fn(tmp_dir)`` must pickle (a module-level function, or a ``functools.partial`` of one) for the
    process and Ray executors.
    """

    stage_dir: Path
    fingerprint: str
    fn: Callable[[Path], Any]

    @property
    def stage(self) -> Stage:
        return Stage(self.stage_dir.parent, self.stage_dir.name, self.fingerprint)

    def run(self) -> dict:
        return self.stage.run(self.fn)


def run_job(job: StageJob) -> dict:
    """Module-level, so that executors can ship it by reference."""
    return job.run()


def _in_worker(threads: int, log_level: int, fn: Callable, item: Any) -> Any:
    """Run ``fn(item)`` in a worker with ``threads`` torch (and OpenCV) threads, logging as the parent does."""
    import cv2
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s",
                            datefmt="%H:%M:%S")
    return fn(item)


def _log_level() -> int:
    return logging.getLogger().getEffectiveLevel()


def worker_bootstrap() -> tuple[Callable | None, tuple]:
    """What a fresh worker process runs first so that it imports this same code.

    Run from a checkout, the import root ``cxr_noisy_student`` is mapped onto the folders by the
    command line (``run_cycle.map_checkout``); a spawned process or a Ray worker starts without
    that mapping (and would import an installed copy, or nothing). Running the command line's top
    level (not its ``main``) in the worker maps it the same way. An installed engine needs nothing.
    """
    script = entry_script()
    if script is None:
        return None, ()
    return runpy.run_path, (str(script), None, "__cxr_worker__")


class LocalExecutor:
    """Everything in this process, one after another: today's behaviour and the reference."""

    kind = "local"

    def map(self, fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass


class ProcessExecutor:
    """The standard library's process pool on this machine (spawned workers, ``threads`` each).

    The pool is started on first use and kept for the run (a worker pays the imports of torch,
    timm and ultralytics once), and shut down by ``close``. Spawn, not fork: forking a process
    whose torch thread pool is running can deadlock the child.
    """

    kind = "processes"

    def __init__(self, workers: int, threads: int = 1):
        if workers < 1:
            raise ConfigError(f"run.fold_workers {workers}: needs at least 1 worker process")
        self.workers, self.threads = int(workers), int(threads)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable, items: Sequence) -> list:
        if not items:
            return []
        if self._pool is None:
            initializer, initargs = worker_bootstrap()
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=initializer, initargs=initargs)
        futures = [self._pool.submit(_in_worker, self.threads, _log_level(), fn, item) for item in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:
        """A copy shipped to a worker (inside a task's context) carries no pool."""
        return {**self.__dict__, "_pool": None}


RAY_MISSING = ("run.executor ray: Ray is not installed in this environment; install the extra with "
               "pip install 'cxr-noisy-student[ray]' (from a checkout: pip install -e '.[ray]')")


class RayExecutor:
    """Ray tasks with resource requests, on a cluster (``address``) or a local Ray started for the run.

    Each item is one Ray task asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs; Ray places them
    and restricts each task to its GPUs (``CUDA_VISIBLE_DEVICES``), so ``run.device: auto`` picks
    the task's own. Stages are written by the workers into the run folder, which every node must
    see (a shared filesystem, as for Slurm). A local Ray is sized for ``workers`` tasks at once.
    """

    kind = "ray"

    def __init__(self, *, address: str = "", workers: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(RAY_MISSING) from None
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigError(f"run.ray_num_cpus_per_fold {num_cpus} / run.ray_num_gpus_per_fold {num_gpus}: "
                              "need cpus > 0 and gpus >= 0")
        self.address, self.workers = address, int(workers)
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self._started = False

    @property
    def threads(self) -> int:
        return max(1, int(self.num_cpus))

    def _init(self):
        import ray

        if not ray.is_initialized():
            initializer, initargs = worker_bootstrap()
            runtime_env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("YOLO_", "CXR_"))}}
            if initializer is not None:
                hook = functools.partial(initializer, *initargs)
                hook.__name__ = "map_import_root"  # Ray names the hook in its logs
                runtime_env["worker_process_setup_hook"] = hook
            kwargs: dict = {"address": self.address} if self.address else {
                "num_cpus": max(1, round(self.workers * self.num_cpus)), "include_dashboard": False}
            ray.init(runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING, **kwargs)
            self._started = True
            log.info("ray: %s", "cluster " + self.address if self.address else f"local, {kwargs['num_cpus']} CPUs")
        return ray

    def map(self, fn: Callable, items: Sequence) -> list:
        if not items:
            return []
        ray = self._init()
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)(_in_worker)
        return ray.get([task.remote(self.threads, _log_level(), fn, item) for item in items])

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_started": False}


Executor = LocalExecutor | ProcessExecutor | RayExecutor


def make_executor(kind: ExecutorKind, *, workers: int = 2, ray_address: str = "", ray_num_cpus: float = 1.0,
                  ray_num_gpus: float = 0.0) -> Executor:
    """The executor a run asked for (``run.executor``); Ray only imported when asked for."""
    if kind == "local":
        return LocalExecutor()
    if kind == "processes":
        return ProcessExecutor(workers)
    if kind == "ray":
        return RayExecutor(address=ray_address, workers=workers, num_cpus=ray_num_cpus, num_gpus=ray_num_gpus)
    raise ConfigError(f"run.executor {kind!r}: not one of local, processes, ray")
