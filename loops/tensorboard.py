"""TensorBoard scalars of training runs, when the optional ``tensorboard`` package is installed.

Why: ``tensorboard --logdir <run folder>`` is what people type to watch a training. Each fold
model gets its own log directory (its run in TensorBoard's list); scalars are written live, one
point per epoch (every numeric value of the epoch's history row: losses, metric, learning rate)
and the training loss every few steps. A fold whose training is reused from an earlier run (a
resumed or repeated command) gets its scalars from its saved history instead
(:func:`write_history`), so the dashboard always shows every fold.

Scalars are written through ``torch.utils.tensorboard.SummaryWriter``, which needs the
``tensorboard`` package (``pip install 'cxr-noisy-student[tensorboard]'``); asked for without it,
:func:`require_tensorboard` stops the run with one line.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from ..datasets.errors import ConfigError
from .trainer import Hook

EVENTS_GLOB = "events.out.tfevents.*"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard(key: str = "run.tensorboard") -> None:
    """One-line ConfigError when TensorBoard scalars are asked for and the package is missing."""
    if not tensorboard_available():
        raise ConfigError(f"{key}: true needs the tensorboard package, which is not installed: "
                          "pip install 'cxr-noisy-student[tensorboard]' (or tensorboard), or set it to false")


def has_events(logdir: Path) -> bool:
    return any(Path(logdir).glob(EVENTS_GLOB))


def numeric_items(row: dict):
    """The (name, value) pairs of a history row worth a scalar: finite numbers, not the counters."""
    for key, value in row.items():
        if key in ("epoch", "epochs", "final", "best") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield key, float(value)


class ScalarLog:
    """One fold model's TensorBoard log directory; ``fresh`` empties it first (a retrained fold)."""

    def __init__(self, logdir: Path, *, fresh: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        if fresh and self.logdir.exists():
            shutil.rmtree(self.logdir)
        self.writer = SummaryWriter(str(self.logdir))

    def epoch(self, row: dict, epoch: int) -> None:
        """Every number of one epoch's history row, at step = the epoch (1-based)."""
        for key, value in numeric_items(row):
            self.writer.add_scalar(f"epoch/{key}", value, epoch)
        self.writer.flush()

    def step(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(f"step/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


def write_history(logdir: Path, rows: list[dict]) -> None:
    """Scalars of a finished training from its history rows (a reused fold that has none yet)."""
    log = ScalarLog(logdir, fresh=True)
    try:
        for number, row in enumerate(rows, start=1):
            log.epoch(row, int(row.get("epoch", number)))
    finally:
        log.close()


class TensorBoardHook(Hook):
    """Live scalars from the one training loop: the loss every ``every`` steps, each epoch's row."""

    def __init__(self, logdir: Path, every: int = 10):
        self.logdir, self.every, self.log = Path(logdir), every, None

    def before_train(self, trainer) -> None:
        self.log = ScalarLog(self.logdir, fresh=True)

    def after_step(self, trainer) -> None:
        if trainer.step % self.every == 0:
            for name, value in trainer.losses.items():
                self.log.step(name, float(value.item()), trainer.step)

    def after_epoch(self, trainer) -> None:
        if trainer.history:
            self.log.epoch(trainer.history[-1], trainer.epoch + 1)

    def close(self, trainer) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
