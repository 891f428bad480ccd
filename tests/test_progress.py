"""Progress you can see and curves you can open: datasets.progress, the trainer's progress hook,
TensorBoard scalars (loops.tensorboard), and the one-line starving warning.

Cheap by design (no model larger than a linear layer): the end-to-end run (tests/test_cycle_e2e.py)
checks the same pieces inside a real run (no doubled detector epoch line, scalars for every fold).
"""
from __future__ import annotations

import io
import logging
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxr_noisy_student.datasets.errors import ConfigError
from cxr_noisy_student.datasets.progress import PROGRESS_ENV, Progress, progress_mode
from cxr_noisy_student.loops.trainer import ProgressHook, Trainer


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="cxr.progress")
    return caplog


def test_log_mode_writes_periodic_lines_with_an_eta(info_logs):
    with Progress(10, "gen0/detector/predictions", "img", mode="log", interval=0.05) as bar:
        for _ in range(10):
            time.sleep(0.02)
            bar.update(1)
            bar.note(loss=0.25)
    lines = [r.getMessage() for r in info_logs.records if r.name == "cxr.progress"]
    assert 2 <= len(lines) <= 10, lines  # periodic, not one per update
    assert all(line.startswith("gen0/detector/predictions: ") and "ETA" in line and "img/s" in line for line in lines)
    assert lines[-1].startswith("gen0/detector/predictions: 10/10 img (100%)") and "loss=0.25" in lines[-1]
    assert bar.n == 10 and bar.total == 10


def test_short_jobs_write_nothing_and_off_counts_silently(info_logs):
    with Progress(5, "quick", "img", mode="log", interval=5.0) as bar:
        bar.update(5)
    with Progress(5, "silent", "img", mode="off") as off:
        off.update(3)
    assert not [r for r in info_logs.records if r.name == "cxr.progress"] and off.n == 3


def test_mode_follows_the_terminal_and_the_environment(monkeypatch, info_logs):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_mode() == "log"  # CI, a log file
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress_mode() == "bar"
    with Progress(3, "bar", "step") as bar:
        bar.update(3)
    assert "\rbar:   0%|" in sys.stderr.getvalue()  # a live tqdm bar, cleared when done (leave=False)
    monkeypatch.setenv(PROGRESS_ENV, "off")
    assert progress_mode() == "off"
    monkeypatch.delenv(PROGRESS_ENV)
    logging.getLogger("cxr.progress").setLevel(logging.WARNING)  # run_cycle.py -q
    try:
        assert progress_mode() == "off"
    finally:
        logging.getLogger("cxr.progress").setLevel(logging.NOTSET)


class LinearTrainer(Trainer):
    """The smallest real use of the loop: a linear regression."""

    def forward(self, batch):
        x, y = batch
        return {"loss": torch.nn.functional.mse_loss(self.model(x), y)}, len(x)


def linear_trainer(hooks, epochs=3, name="classifier gen 0 fold 1") -> Trainer:
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return LinearTrainer(model, loader, opt, sched, epochs=epochs, device="cpu", hooks=hooks, name=name)


def test_progress_hook_one_bar_over_every_step_named_by_the_run(info_logs, monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "log")
    hook = ProgressHook(every=1)
    linear_trainer([hook]).train()
    assert hook.bar.n == hook.bar.total == 12  # 3 epochs x 4 steps
    assert hook.bar.desc == "classifier gen 0 fold 1"


def test_hooks_are_closed_when_training_fails():
    closed = []

    class Recorder(ProgressHook):
        def close(self, trainer):
            closed.append(trainer.step)
            super().close(trainer)

    class Exploding(LinearTrainer):
        def forward(self, batch):
            losses, n = super().forward(batch)
            if self.step == 2:
                losses["loss"] = losses["loss"] * float("nan")
            return losses, n

    trainer = linear_trainer([Recorder()])
    trainer.__class__ = Exploding
    with pytest.raises(FloatingPointError, match="classifier gen 0 fold 1: training loss is nan at step 3"):
        trainer.train()
    assert closed == [2]


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_hook_writes_live_scalars_per_epoch_and_step(tmp_path):
    pytest.importorskip("tensorboard")
    from cxr_noisy_student.loops.tensorboard import TensorBoardHook, has_events

    logdir = tmp_path / "tensorboard" / "gen0" / "classifier" / "fold1"
    trainer = linear_trainer([TensorBoardHook(logdir, every=2)])
    trainer.train()
    assert has_events(logdir)
    scalars = read_scalars(logdir)
    losses = [v for _, v in scalars["epoch/train_loss"]]
    assert [s for s, _ in scalars["epoch/train_loss"]] == [1, 2, 3] and losses == pytest.approx(
        [row["train_loss"] for row in trainer.history], rel=1e-6)
    assert [s for s, _ in scalars["step/loss"]] == [2, 4, 6, 8, 10, 12] and "epoch/lr" in scalars


def test_tensorboard_from_history_and_a_one_line_error_without_the_package(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from cxr_noisy_student.loops import tensorboard as tb

    rows = [{"epoch": 1, "train_loss": 2.0, "val_loss": 3.0, "metric": 0.5, "best": True},
            {"epoch": 2, "train_loss": 1.0, "val_loss": 2.5, "metric": None, "best": False}]
    tb.write_history(tmp_path / "fold0", rows)
    scalars = read_scalars(tmp_path / "fold0")
    assert scalars["epoch/val_loss"] == [(1, 3.0), (2, 2.5)] and scalars["epoch/metric"] == [(1, 0.5)]
    assert "epoch/best" not in scalars  # flags and counters are not curves
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"run.tensorboard: true needs the tensorboard package") as err:
        tb.require_tensorboard()
    assert "\n" not in str(err.value) and "[tensorboard]" in str(err.value)


def test_starving_classes_share_one_warning_line(caplog):
    from cxr_noisy_student.teacher_student.tasks.base import warn_starving

    caplog.set_level(logging.WARNING, logger="cxr.cycle")
    why = "threshold rests on 0 OOF box(es) (< 10)"
    warn_starving("detector", ["f0/orig", "f0/hflip"], {"starving": {f"c{i}": why for i in range(14)}, "fallback": {}})
    warn_starving("classifier", ["f1"], {"starving": {"No finding": "no pool image reaches its threshold"},
                                         "fallback": {"No finding": 4}})
    weak = {"starving": {"Nodule": "threshold rests on 3 OOF box(es) (< 10)"}, "fallback": {}}
    warn_starving("detector", ["f0/orig"], {**weak, "fallback_mode": "none"}, kept={"Nodule": 52})
    warn_starving("detector", ["f0/orig"], {**weak, "fallback_mode": "drop"}, kept={})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("detector pseudo labels from f0/orig+f0/hflip: 14 class(es) starve: 'c0', 'c1'")
    assert lines[0].endswith(f"({why}; keeps nothing)")
    assert lines[1].endswith("'No finding' (no pool image reaches its threshold; top_k fallback kept 4)")
    assert lines[2].endswith("'Nodule' (threshold rests on 3 OOF box(es) (< 10); 52 kept, flagged (fallback none))")
    assert lines[3].endswith("'Nodule' (threshold rests on 3 OOF box(es) (< 10); none kept (fallback drop))")
