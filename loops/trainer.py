"""The one training loop, short, with hooks (detectron2's ``SimpleTrainer`` / ``TrainerBase`` shape).

Every model the engine trains itself goes through ``Trainer.train``: the timm classifier
(``loops.train.fit``) and the effdet detector (``teacher_student.detectors.effdet``). A task
subclasses ``Trainer`` and says only what differs: ``forward`` (one batch -> a dict of losses whose
"loss" is what trains, as detectron2's models return) and ``end_epoch`` (validate, call
``keep_if_best``, log). The loop owns the rest, once: backward, gradient clipping, the optimiser
and schedule steps, EMA, mixed precision on CUDA (bf16 autocast; a GradScaler when the GPU only has
fp16), the non-finite loss check, hooks, history, and putting the best (or last) weights back.

Hooks run inside the loop, so they must be cheap: reading ``trainer.losses`` as tensors costs
nothing, calling ``.item()`` on every step forces a GPU sync (``ProgressHook`` does it every few
steps only).
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Any, Sequence

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from ..datasets.errors import TrainingError
from .predict import amp_context, amp_dtype

LossDict = dict[str, torch.Tensor]


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite; the message is one line naming run, step and epoch."""


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine to 0 at ``total_steps`` (multiplies the base learning rate)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict on the CPU: what a later epoch's updates cannot change."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ hooks


class Hook:
    """Override any of these; each gets the running ``Trainer``. Keep them cheap."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_epoch(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def close(self, trainer: "Trainer") -> None:
        """Always called last, also when training fails: release what before_train took."""


class ProgressHook(Hook):
    """One progress bar per fit over all its steps, with epoch and running loss (``datasets.progress``:
    a bar on a terminal, a log line with an ETA every few seconds elsewhere). The loss is read every
    ``every`` steps only (``.item()`` is a GPU sync); epoch log lines print above the bar."""

    def __init__(self, every: int = 10):
        self.every, self.bar, self._redirect = every, None, None

    def before_train(self, trainer: "Trainer") -> None:
        from ..datasets.progress import Progress

        self.bar = Progress(trainer.epochs * trainer.steps_per_epoch, trainer.name or "training", "step")
        self._redirect = self.bar.logging_redirected()
        self._redirect.__enter__()

    def after_step(self, trainer: "Trainer") -> None:
        self.bar.update(1)
        if trainer.step % self.every == 0:
            self.bar.note(epoch=f"{trainer.epoch + 1}/{trainer.epochs}",
                          **{k: float(v.item()) for k, v in trainer.losses.items()})

    def close(self, trainer: "Trainer") -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
            self.bar.close()


# ------------------------------------------------------------------------------ the loop


class Trainer:
    """State of one fit: model, loader, optimiser, schedule, counters, the last losses, history, best weights.

    Subclasses implement ``forward`` and ``end_epoch``; the caller builds the loader, optimiser and
    schedule (they differ between tasks) and seeds torch before building them.
    """

    def __init__(
        self, model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, *, epochs: int, device: torch.device | str,
        grad_clip: float = 0.0, ema_decay: float = 0.0, amp: bool = False, patience: int = 0,
        hooks: Sequence[Hook] = (), name: str | None = None,
    ):
        """
        Args:
            model: already on ``device``; trained in place, holds the returned weights at the end.
            grad_clip: gradient norm clipping; 0 disables it.
            ema_decay: exponential moving average of the weights (validated and returned); 0: none.
            amp: mixed precision, used only on CUDA (see ``autocast``).
            patience: stop after this many epochs without a better ``keep_if_best`` score; 0: never.
            name: names the run (e.g. "classifier gen 1 fold 2") in the non-finite loss error.
        """
        self.model, self.loader, self.optimizer, self.scheduler = model, loader, optimizer, scheduler
        self.epochs, self.grad_clip, self.patience = int(epochs), float(grad_clip), int(patience)
        self.hooks, self.name = list(hooks), name
        self.device = torch.device(device)
        self.fast = amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fast and amp_dtype(self.device) == torch.float16)
        self.ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay > 0 else None
        self.steps_per_epoch = len(loader)
        self.epoch = self.step = 0
        self.losses: LossDict = {}
        """Detached losses of the last step."""
        self.epoch_steps: list[tuple[LossDict, int]] = []
        """This epoch's detached losses and sample counts, step by step (reduced in ``end_epoch``)."""
        self.epoch_started = 0.0
        """``time.perf_counter()`` when this epoch's first step began."""
        self.history: list[dict] = []
        self.best_score = -math.inf
        self.best_state: dict | None = None
        self.best_epoch = -1
        self.stop = False

    # -------------------------------------------------------------- what a task says
    def forward(self, batch: Any) -> tuple[LossDict, int]:
        """One batch -> (its losses, with the one to train on under "loss"; its number of samples)."""
        raise NotImplementedError

    def end_epoch(self) -> dict:
        """Validate, ``keep_if_best``, log; returns the epoch's history row. Default: the train loss only."""
        return {"epoch": self.epoch + 1, "train_loss": self.epoch_loss(), "lr": self.lr}

    # -------------------------------------------------------------- the loop
    def train(self) -> None:
        """Run the epochs; on return the model holds the best weights (the last without a score)."""
        try:
            self._call("before_train")
            for self.epoch in range(self.epochs):
                self._call("before_epoch")
                self.epoch_started, self.epoch_steps = time.perf_counter(), []
                self.model.train()
                for batch in self.loader:
                    self.run_step(batch)
                    self._call("after_step")
                self.history.append(self.end_epoch())
                self._call("after_epoch")
                if self.stop:
                    break
            self._call("after_train")
        finally:
            self._call("close")
        self.finish()

    def run_step(self, batch: Any) -> None:
        """Forward, finite check, backward, clip, step, schedule, EMA."""
        losses, samples = self.forward(batch)
        self.check_finite(losses["loss"])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.losses = {k: v.detach() for k, v in losses.items()}
        self.epoch_steps.append((self.losses, samples))

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop before a NaN/inf loss reaches the weights: every later step and prediction would be garbage.

        Checked before backward on every step; on CUDA that is one sync per step (detectron2 pays
        the same), small next to a training step.
        """
        if bool(torch.isfinite(loss.detach()).all()):
            return
        where = f"{self.name}: " if self.name else ""
        raise NonFiniteLossError(
            f"{where}training loss is {float(loss.detach().float().mean())} at step {self.step + 1} "
            f"(epoch {self.epoch + 1}/{self.epochs}); stopped instead of training on: "
            "lower the learning rate or check the inputs"
        )

    def autocast(self) -> AbstractContextManager:
        """bf16 (or fp16) autocast when training with AMP on CUDA; full precision otherwise."""
        return amp_context(self.device, self.fast)

    # -------------------------------------------------------------- epoch bookkeeping
    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and returned: the EMA ones when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def epoch_loss(self) -> float:
        """This epoch's train loss, the mean over samples (one GPU sync, at the end of the epoch)."""
        loss_sum, seen = torch.zeros((), device=self.device), 0
        for losses, samples in self.epoch_steps:
            loss_sum += losses["loss"] * samples
            seen += samples
        return loss_sum.item() / seen

    def epoch_samples(self) -> int:
        return sum(samples for _, samples in self.epoch_steps)

    def keep_if_best(self, score: float) -> bool:
        """Keep the eval model's weights if ``score`` (higher is better) beats every earlier epoch's.

        The first scored epoch always counts, so a run whose scores are all -inf still returns one
        of its epochs. Also decides early stopping (``patience``).
        """
        improved = self.best_state is None or score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_state = cpu_state(self.eval_model)
        self.stop = self.patience > 0 and self.epoch - self.best_epoch >= self.patience
        return improved

    def finish(self) -> None:
        """Put the returned weights (best epoch, or the last when no epoch was scored) into the model."""
        if self.best_state is None:
            self.best_state = cpu_state(self.eval_model)
        self.model.load_state_dict(self.best_state)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)
