"""The classifier fit: soft-target losses and the classifier's side of the one training loop.

``fit`` builds a ``ClassifierTrainer`` (a ``loops.trainer.Trainer``) and runs it; the loop itself,
hooks included, is ``Trainer.train``. This module says only what is particular to classifiers: the
weighted soft-target loss, timm's optimiser, warmup + cosine, validation with a metric, and precise BN.

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
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, get_worker_info

from ..datasets.errors import ConfigError
from . import distributed
from .config import TrainConfig
from .predict import activate, predict_logits
from .seg_loss import segmentation_loss
from .trainer import Hook, Trainer, lr_factor

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
    name: str | None = None, sampler_weights: Sequence[float] | np.ndarray | None = None,
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
        name: names the run ("classifier gen 1 fold 0") in the one-line non-finite loss error.
        sampler_weights: one draw weight per training sample: each epoch draws len(train_ds)
            samples with replacement in proportion to them (``WeightedRandomSampler``, e.g. class
            balancing); None shuffles every sample once per epoch.
    """
    trainer = ClassifierTrainer(model, train_ds, val_ds, cfg, loss=loss, metric_fn=metric_fn, device=device, hooks=hooks,
                                log=log, seed=seed, precise_bn_batches=precise_bn_batches, name=name,
                                sampler_weights=sampler_weights)
    trainer.train()
    return trainer.result()


class ClassifierTrainer(Trainer):
    """The classifier's side of the loop: weighted soft-target loss, metric validation, precise BN."""

    def __init__(self, model, train_ds, val_ds, cfg: TrainConfig, *, loss, metric_fn, device, hooks, log, seed,
                 precise_bn_batches=20, name=None, sampler_weights=None):
        if len(train_ds) < 2:
            raise ValueError(f"need at least 2 training images, got {len(train_ds)}")
        sample_losses(torch.zeros(1, 1), torch.zeros(1, 1), kind=loss)  # validates the loss kind
        self.cfg, self.kind, self.metric_fn, self.log = cfg, loss, metric_fn, log
        self.train_ds, self.val_ds = train_ds, val_ds
        device = torch.device(device)
        fast = cfg.amp and device.type == "cuda"
        rank, self.world_size = distributed.world()
        torch.manual_seed(seed)
        if hasattr(train_ds, "reseed"):
            train_ds.reseed(seed + 7919 * rank)  # ranks augment their shares with streams of their own
        if self.world_size > 1:
            model = distributed.sync_batchnorm(model, device)
        model = model.to(device, memory_format=torch.channels_last if fast else torch.preserve_format)
        loader = self.build_loader(train_ds, cfg, seed, rank, device, sampler_weights)
        total = cfg.epochs * len(loader)
        optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = round(cfg.warmup_epochs * len(loader))
        schedule = lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        super().__init__(model, loader, optimizer, scheduler, epochs=cfg.epochs, device=device, grad_clip=cfg.grad_clip,
                         ema_decay=cfg.ema_decay, amp=cfg.amp, patience=cfg.patience, hooks=hooks, name=name)
        self.best_metric: float | None = None
        self.precise_bn_batches = precise_bn_batches
        self.global_batch = min(cfg.batch_size, len(train_ds))
        self.net = distributed.wrap(model, device) if self.world_size > 1 else model
        """What forward runs through: the model, or its DistributedDataParallel wrapper under torchrun."""

    def build_loader(self, train_ds, cfg: TrainConfig, seed: int, rank: int, device: torch.device,
                     sampler_weights=None) -> DataLoader:
        """Shuffled (or weighted-drawn) batches of ``cfg.batch_size``; under torchrun each rank loads
        its equal share of the very batches a one-process fit would make (``distributed.ShardedBatchSampler``)."""
        n, common = len(train_ds), dict(num_workers=cfg.workers, worker_init_fn=_seed_worker,
                                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
        if self.world_size == 1:
            generator = torch.Generator().manual_seed(seed)
            sampler = _weighted_sampler(sampler_weights, n, generator)
            return DataLoader(train_ds, batch_size=min(cfg.batch_size, n), shuffle=sampler is None, sampler=sampler,
                              drop_last=n > cfg.batch_size, generator=generator, **common)
        if sampler_weights is not None:
            raise ConfigError("weighted sampling (grader.sampling, pseudo.labeled_share) is not available under torchrun; "
                              "use uniform draws (inverse_frequency off, labeled_share 0)")
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size {cfg.batch_size}: the global batch must divide by the "
                              f"{self.world_size} torchrun processes (each takes an equal share)")
        sampler = distributed.ShardedBatchSampler(n, min(cfg.batch_size, n), drop_last=n > cfg.batch_size, seed=seed,
                                                  rank=rank, world_size=self.world_size)
        return DataLoader(train_ds, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed + rank), **common)

    def forward(self, batch: dict) -> tuple[dict[str, torch.Tensor], int]:
        """Weighted soft-target loss of one batch (logits under autocast, the loss in float32)."""
        x = batch["image"].to(self.device, non_blocking=True)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["target"].to(self.device, non_blocking=True)
        w = batch["weight"].to(self.device, non_blocking=True)
        with self.autocast():
            if "mask" in batch and hasattr(self.model, "forward_aux"):
                return self.aux_forward(x, y, w, batch), len(batch["image"])
            logits = self.net(x)
        loss = weighted_loss(logits, y, w, kind=self.kind)
        if self.world_size > 1 and len(x) * self.world_size != self.global_batch:
            # unequal shares (one short batch split unevenly): DDP averages the ranks' gradients, so
            # weigh each rank's mean by its share to keep the global batch mean
            loss = loss * (len(x) * self.world_size / self.global_batch)
        return {"loss": loss}, len(batch["image"])

    def aux_forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Class loss + the model's ``aux_weight`` x the mask loss of its auxiliary decoder head
        (images without a mask have mask weight 0); prediction never uses that head."""
        logits, mask_logits = self.model.forward_aux(x)
        cls = weighted_loss(logits, y, w, kind=self.kind)
        seg = segmentation_loss(mask_logits, batch["mask"].to(self.device), batch["mask_weight"].to(self.device))
        return {"loss": cls + self.model.aux_weight * seg["loss"], "class_loss": cls, "mask_loss": seg["loss"]}

    def end_epoch(self) -> dict:
        """Validate, keep the best weights, decide early stopping, log one line."""
        train_loss = self.epoch_loss()
        if self.world_size > 1:  # the global mean over every rank's samples
            loss_sum, seen = distributed.all_sum([train_loss * self.epoch_samples(), self.epoch_samples()], self.device)
            train_loss = loss_sum / seen
        images_per_s = self.epoch_samples() / (time.perf_counter() - self.epoch_started)
        row = {"epoch": self.epoch + 1, "train_loss": train_loss, "lr": self.lr, "images_per_s": images_per_s}
        if self.val_ds is not None and len(self.val_ds):
            self.recalibrate_bn()
            row.update(self.validate())
            score = -math.inf if row["metric"] is None else row["metric"]
            row["best"] = self.keep_if_best(self.epoch if self.cfg.keep == "last" else score)
            if row["best"]:
                self.best_metric = row["metric"]
        stop = f" | early stop: no better metric for {self.cfg.patience} epochs" if self.stop else ""
        self.log((f"{self.name}: " if self.name else "") + _format_row(row, self.cfg.epochs) + stop)
        return row

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
            with self.autocast():
                model(x.contiguous(memory_format=torch.channels_last) if self.fast else x)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        distributed.average_buffers(model)  # under torchrun: each rank saw its share of the batches
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
        # every rank validates the same weights; rank 0's numbers decide, so early stopping agrees
        return distributed.from_rank0({"val_loss": val_loss, "metric": metric})

    def finish(self) -> None:
        """As ``Trainer.finish``; without validation the last weights get precise BN first."""
        if self.best_state is None:
            self.recalibrate_bn()
        super().finish()

    def result(self) -> FitResult:
        return FitResult(self.best_state, self.best_metric, self.history, len(self.history))


def _weighted_sampler(weights, n: int, generator: torch.Generator) -> WeightedRandomSampler | None:
    """Draws n samples per epoch with replacement, in proportion to ``weights`` (None: no sampler)."""
    if weights is None:
        return None
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"sampler_weights must be {n} finite non-negative weights, not all 0 (got shape {tuple(w.shape)})")
    return WeightedRandomSampler(w, num_samples=n, replacement=True, generator=generator)


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
