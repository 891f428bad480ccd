"""The classifier fit loop: short, with hooks (detectron2's ``TrainerBase`` shape).

``fit`` builds a ``Trainer`` and runs it. The loop itself is ``Trainer.train`` (about 15 lines);
everything optional (progress bars, extra logging, plots) is a ``Hook``. Hooks run inside the
loop, so they must be cheap: reading ``trainer.losses`` as tensors costs nothing, calling
``.item()`` on every step forces a GPU sync (``ProgressHook`` does it every few steps only).

Before each validation (and before returning the last weights when there is none) BatchNorm
statistics are re-estimated over a few training batches with the current weights ("precise BN",
as detectron2's PreciseBN hook does). Why: with momentum 0.1 the running statistics lag the weights
by ~10 steps; on a short run (the demo, small folds) a model that is perfect in train mode scores
chance level in eval mode, and early stopping then keeps the wrong epoch. It costs forward passes
over ``precise_bn_batches`` batches (20), at most a quarter of an epoch's but at least 4: under 1%
of a long epoch, about 8% of a short one (only tiny epochs of a few steps pay more).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .predict import activate, amp_context, amp_dtype, predict_logits
from .config import TrainConfig

LossKind = Literal["softmax", "bce"]
MetricFn = Callable[[np.ndarray, np.ndarray], float]


# ------------------------------------------------------------------------------ losses


def sample_losses(logits: torch.Tensor, targets: torch.Tensor, *, kind: LossKind) -> torch.Tensor:
    """Per-sample loss (N,) against soft targets.

    softmax: soft cross-entropy ``-sum_c t_c log softmax(z)_c`` (equals the usual cross-entropy for
    one-hot targets). bce: binary cross-entropy with logits, averaged over classes.
    """
    logits, targets = logits.float(), targets.float()
    if kind == "softmax":
        return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
    raise ValueError(f"loss must be 'softmax' or 'bce', got {kind!r}")


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, *, kind: LossKind) -> torch.Tensor:
    """Mean over the batch of weight x per-sample loss.

    Divided by the batch size, not by the weight sum: a pseudo label of weight 0.5 then counts half
    as much as a labeled image whatever else is in its batch.
    """
    return (sample_losses(logits, targets, kind=kind) * weights.float()).mean()


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to 1, then cosine to 0 at ``total_steps`` (multiplies the base learning rate)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------ hooks


class Hook:
    """Override any of these; each gets the running ``Trainer``. Keep them cheap."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_epoch(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...


class ProgressHook(Hook):
    """A tqdm bar per epoch with the running loss (read every ``every`` steps, to avoid GPU syncs)."""

    def __init__(self, every: int = 10):
        self.every, self.bar = every, None

    def before_epoch(self, trainer: "Trainer") -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch + 1}/{trainer.cfg.epochs}", leave=False)

    def after_step(self, trainer: "Trainer") -> None:
        self.bar.update(1)
        if trainer.step % self.every == 0:
            self.bar.set_postfix({k: f"{v.item():.4f}" for k, v in trainer.losses.items()})

    def after_epoch(self, trainer: "Trainer") -> None:
        self.bar.close()


@dataclass
class FitResult:
    best_state: dict
    """State dict (CPU tensors) of the returned weights: the best epoch (EMA weights if EMA is on)."""
    best_metric: float | None
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0


# ------------------------------------------------------------------------------ the loop


def fit(
    model: nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig, *,
    loss: LossKind, metric_fn: MetricFn | None = None, device: torch.device | str = "cpu",
    hooks: Sequence[Hook] = (), log: Callable[[str], None] = print, seed: int = 0, precise_bn_batches: int = 20,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best weights (the last without val_ds).

    Args:
        model: a classifier returning logits (N, C).
        train_ds / val_ds: datasets of dicts with image, target, weight (``ClassificationDataset``).
        cfg: optimiser, schedule, EMA, clipping, early stopping, AMP.
        loss: "softmax" (multiclass, soft cross-entropy) or "bce" (multilabel).
        metric_fn: ``metric_fn(y_true, probs) -> float``, higher is better; None: minus the val loss.
        device: where to train; AMP and channels_last are used only on CUDA.
        hooks: extra behaviour (``ProgressHook``...).
        log: one line per epoch goes here.
        seed: seeds torch (dropout, stochastic depth), the loader's shuffling and the augmentation.
        precise_bn_batches: training batches used to re-estimate BatchNorm statistics before each
            validation, capped at max(4, a quarter of an epoch) (0: keep the running statistics).
    """
    return Trainer(model, train_ds, val_ds, cfg, loss=loss, metric_fn=metric_fn, device=device, hooks=hooks, log=log,
                   seed=seed, precise_bn_batches=precise_bn_batches).train()


class Trainer:
    """State of one fit: model, optimiser, schedule, counters, the last losses, history, best weights."""

    def __init__(self, model, train_ds, val_ds, cfg: TrainConfig, *, loss, metric_fn, device, hooks, log, seed,
                 precise_bn_batches=20):
        if len(train_ds) < 2:
            raise ValueError(f"need at least 2 training images, got {len(train_ds)}")
        sample_losses(torch.zeros(1, 1), torch.zeros(1, 1), kind=loss)  # validates the loss kind
        self.cfg, self.kind, self.metric_fn, self.hooks, self.log = cfg, loss, metric_fn, list(hooks), log
        self.train_ds, self.val_ds = train_ds, val_ds
        self.device = torch.device(device)
        self.fast = cfg.amp and self.device.type == "cuda"
        torch.manual_seed(seed)
        if hasattr(train_ds, "reseed"):
            train_ds.reseed(seed)
        self.model = model.to(self.device, memory_format=torch.channels_last if self.fast else torch.preserve_format)
        self.loader = DataLoader(
            train_ds, batch_size=min(cfg.batch_size, len(train_ds)), shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
            num_workers=cfg.workers, generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.workers > 0,
        )
        self.steps_per_epoch = len(self.loader)
        total = cfg.epochs * self.steps_per_epoch
        self.optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = round(cfg.warmup_epochs * self.steps_per_epoch)
        schedule = lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fast and amp_dtype(self.device) == torch.float16)
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay > 0 else None
        self.epoch = self.step = 0
        self.losses: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self.best_metric: float | None = None
        self.best_score = -math.inf
        self.best_state: dict | None = None
        self.best_epoch = -1
        self.stop = False
        self.precise_bn_batches = precise_bn_batches

    def train(self) -> FitResult:
        self._call("before_train")
        for self.epoch in range(self.cfg.epochs):
            self._call("before_epoch")
            started, loss_sum, seen = time.perf_counter(), torch.zeros((), device=self.device), 0
            self.model.train()
            for batch in self.loader:
                self.run_step(batch)
                loss_sum += self.losses["loss"] * len(batch["image"])
                seen += len(batch["image"])
                self._call("after_step")
            self.end_epoch(loss_sum.item() / seen, seen / (time.perf_counter() - started))
            self._call("after_epoch")
            if self.stop:
                break
        self._call("after_train")
        return self.finish()

    def run_step(self, batch: dict) -> None:
        """Forward, weighted soft-target loss, backward, clip, step, schedule, EMA."""
        x = batch["image"].to(self.device, non_blocking=True)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["target"].to(self.device, non_blocking=True)
        w = batch["weight"].to(self.device, non_blocking=True)
        with amp_context(self.device, self.fast):
            logits = self.model(x)
        losses = {"loss": weighted_loss(logits, y, w, kind=self.kind)}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.losses = {k: v.detach() for k, v in losses.items()}

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def end_epoch(self, train_loss: float, images_per_s: float) -> None:
        """Validate, keep the best weights, decide early stopping, log one line."""
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": self.epoch + 1, "train_loss": train_loss, "lr": lr, "images_per_s": images_per_s}
        if self.val_ds is not None and len(self.val_ds):
            self.recalibrate_bn()
            row.update(self.validate())
            score = -math.inf if row["metric"] is None else row["metric"]
            improved = self.best_state is None or score > self.best_score
            if improved:
                self.best_score = score
                self.best_metric, self.best_epoch = row["metric"], self.epoch
                self.best_state = _cpu_state(self.eval_model)
            row["best"] = improved
            patience = self.cfg.patience
            self.stop = patience > 0 and self.epoch - self.best_epoch >= patience
        self.history.append(row)
        stop = f" | early stop: no better metric for {self.cfg.patience} epochs" if self.stop else ""
        self.log(_format_row(row, self.cfg.epochs) + stop)

    @torch.no_grad()
    def recalibrate_bn(self) -> None:
        """Re-estimate BatchNorm running statistics of the evaluated model over training batches."""
        model = self.eval_model
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms or self.precise_bn_batches <= 0:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        was_training = model.training
        model.train()
        batches = min(self.precise_bn_batches, max(4, math.ceil(self.steps_per_epoch / 4)))
        for batch in itertools.islice(self.loader, batches):
            x = batch["image"].to(self.device, non_blocking=True)
            with amp_context(self.device, self.fast):
                model(x.contiguous(memory_format=torch.channels_last) if self.fast else x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)

    def validate(self) -> dict:
        logits = predict_logits(self.eval_model, self.val_ds, device=self.device, batch_size=self.cfg.batch_size,
                                workers=self.cfg.workers, amp=self.cfg.amp)[0]
        targets = torch.as_tensor(np.asarray(self.val_ds.targets), dtype=torch.float32)
        weights = torch.as_tensor(np.asarray(getattr(self.val_ds, "weights", np.ones(len(targets)))), dtype=torch.float32)
        val_loss = weighted_loss(torch.from_numpy(logits), targets, weights, kind=self.kind).item()
        metric = -val_loss
        if self.metric_fn is not None:
            value = self.metric_fn(targets.numpy(), activate(logits, "softmax" if self.kind == "softmax" else "sigmoid"))
            metric = float(value) if value is not None and np.isfinite(value) else None
        return {"val_loss": val_loss, "metric": metric}

    def finish(self) -> FitResult:
        """Put the returned weights (best epoch, or last without validation) into the model."""
        if self.best_state is None:
            self.recalibrate_bn()
            self.best_state = _cpu_state(self.eval_model)
        self.model.load_state_dict(self.best_state)
        return FitResult(self.best_state, self.best_metric, self.history, len(self.history))

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _seed_worker(worker_id: int) -> None:
    """Each loader worker gets its own, reproducible augmentation stream (torch derives info.seed
    from the loader's generator, so the whole run is reproducible from ``seed``)."""
    info = get_worker_info()
    np.random.seed(info.seed % 2**32)
    if hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


def _format_row(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        metric = "undefined" if row["metric"] is None else f"{row['metric']:.4f}"
        parts += [f"val_loss {row['val_loss']:.4f}", f"metric {metric}" + (" *" if row["best"] else "")]
    parts += [f"lr {row['lr']:.2e}", f"{row['images_per_s']:.0f} img/s"]
    return " | ".join(parts)
