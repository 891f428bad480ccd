"""Dense prediction through the one training loop: the segmenter's loss, fit and prediction.

``SegmentationTrainer`` is the classifier's trainer (``loops.train.ClassifierTrainer``: timm's
optimiser, warmup + cosine, precise BatchNorm before each validation, best-epoch weights) with a
per-pixel forward and a dice validation; the loop itself is ``Trainer.train``. Generic: a model is
anything mapping (N, 1, H, W) images to (N, 1, H, W) logits.

Loss: BCE + soft dice, both per image and weighted per sample (pseudo masks may weigh less). Why
both: BCE alone is dominated by the background on small lesions; dice alone gives no gradient to
an empty target (and is unstable early). The soft dice has a smoothing of 1 pixel, so an empty
target answered with an empty prediction costs nothing -- SIIM-ACR's rule, in the loss too.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..augment.mix import cutmix_batch
from .config import TrainConfig
from .predict import amp_context, prediction_loader
from .seg_loss import segmentation_loss
from .seg_metrics import dice_per_image
from .train import ClassifierTrainer, FitResult
from .trainer import Hook

class SegmentationTrainer(ClassifierTrainer):
    """The classifier's loop with masks: BCE + dice per batch, mean per-image dice at 0.5 to validate;
    ``cutmix`` > 0 mixes that share of each batch's samples (``augment.mix.cutmix_batch``)."""

    def __init__(self, model, train_ds, val_ds, cfg: TrainConfig, *, device, hooks=(), log=print, seed=0,
                 precise_bn_batches=20, name=None, dice_weight: float = 1.0, sampler_weights=None,
                 cutmix: float = 0.0):
        self.dice_weight, self.cutmix = float(dice_weight), float(cutmix)
        self.mix_generator = torch.Generator().manual_seed(seed + 104729)
        super().__init__(model, train_ds, val_ds, cfg, loss="bce", metric_fn=None, device=device, hooks=hooks, log=log,
                         seed=seed, precise_bn_batches=precise_bn_batches, name=name, sampler_weights=sampler_weights)

    def forward(self, batch: dict) -> tuple[dict[str, torch.Tensor], int]:
        x, mask, weight = batch["image"], batch["mask"], batch["weight"]
        if self.cutmix > 0:
            x, mask, weight = cutmix_batch(x, mask, weight, prob=self.cutmix, generator=self.mix_generator)
        x = x.to(self.device, non_blocking=True)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.model(x)
        losses = segmentation_loss(logits, mask.to(self.device), weight.to(self.device), dice_weight=self.dice_weight)
        return losses, len(x)

    def validate(self) -> dict:
        probs = predict_mask_probs(self.eval_model, self.val_ds, device=self.device, batch_size=self.cfg.batch_size,
                                   tta_hflip=False, amp=self.cfg.amp)
        truth = np.stack([self.val_ds[i]["mask"][0] for i in range(len(self.val_ds))]) >= 0.5
        logits = torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6))
        val = segmentation_loss(logits, torch.from_numpy(truth), torch.ones(len(truth)), dice_weight=self.dice_weight)
        return {"val_loss": float(val["loss"]), "metric": float(dice_per_image(probs >= 0.5, truth).mean())}


def fit_segmenter(model: nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig, *,
                  device: torch.device | str = "cpu", hooks: Sequence[Hook] = (), log: Callable[[str], None] = print,
                  seed: int = 0, name: str | None = None, dice_weight: float = 1.0,
                  sampler_weights=None, cutmix: float = 0.0) -> FitResult:
    """Train a segmentation model in place; on return it holds the best-dice epoch's weights (the
    last without ``val_ds``). Arguments as ``loops.train.fit``; ``cutmix`` as SegmentationTrainer."""
    trainer = SegmentationTrainer(model, train_ds, val_ds, cfg, device=device, hooks=hooks, log=log, seed=seed,
                                  name=name, dice_weight=dice_weight, sampler_weights=sampler_weights, cutmix=cutmix)
    trainer.train()
    return trainer.result()


@torch.inference_mode()
def predict_mask_views(model: nn.Module, dataset: Dataset, *, device: torch.device | str, batch_size: int,
                       tta_hflip: bool = True, amp: bool = True) -> np.ndarray:
    """Mask probabilities per view, (V, N, H, W) float32 in dataset order: the sigmoid of the image
    and, with ``tta_hflip``, of its mirror flipped back (so its pixels line up with the image's).
    Their mean is the model's prediction; their agreement is one measure of its confidence."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    views: list[list[torch.Tensor]] = [[] for _ in range(2 if tta_hflip else 1)]
    try:
        for batch in prediction_loader(dataset, device=device, batch_size=batch_size):
            x = batch["image"].to(device)
            with amp_context(device, amp):
                views[0].append(model(x).float().sigmoid()[:, 0].cpu())
                if tta_hflip:
                    views[1].append(model(x.flip(-1)).float().sigmoid().flip(-1)[:, 0].cpu())
    finally:
        model.train(was_training)
    if not views[0]:
        return np.zeros((len(views), 0, 0, 0), np.float32)
    return torch.stack([torch.cat(v) for v in views]).numpy()


def predict_mask_probs(model: nn.Module, dataset: Dataset, *, device: torch.device | str, batch_size: int,
                       tta_hflip: bool = True, amp: bool = True) -> np.ndarray:
    """(N, H, W) mask probabilities: the mean over the views of :func:`predict_mask_views`."""
    return predict_mask_views(model, dataset, device=device, batch_size=batch_size, tta_hflip=tta_hflip,
                              amp=amp).mean(axis=0)
