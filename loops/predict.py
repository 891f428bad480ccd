"""Batched prediction with flip TTA: the only place class probabilities are made.

TTA views are applied to the normalized batch on the device (a flip of the last axis), not in the
dataset, so each image is loaded and converted once however many views there are.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..augment.transforms import apply_view, tta_views


def amp_context(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when the GPU has it (fp16 otherwise); full precision elsewhere."""
    if not (enabled and device.type == "cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prediction_loader(dataset: Dataset, *, device: torch.device, batch_size: int, workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")


@torch.inference_mode()
def predict_logits(
    model: nn.Module, dataset: Dataset, *, device: torch.device | str, batch_size: int,
    views: Sequence[str] = ("identity",), workers: int = 0, amp: bool = True,
) -> np.ndarray:
    """Raw logits, shape (V, N, C): one slice per view, rows in dataset order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    cuda_fast = amp and device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if cuda_fast else torch.preserve_format)
    out: list[list[torch.Tensor]] = [[] for _ in views]
    try:
        for batch in prediction_loader(dataset, device=device, batch_size=batch_size, workers=workers):
            x = batch["image"].to(device, non_blocking=True)
            if cuda_fast:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp_context(device, amp):
                for v, view in enumerate(views):
                    out[v].append(model(apply_view(x, view)).float())
    finally:
        model.train(was_training)
    if not out[0]:
        return np.zeros((len(views), 0, getattr(dataset, "num_classes", 0)), np.float32)
    return torch.stack([torch.cat(chunks) for chunks in out]).cpu().numpy()


def activate(logits: np.ndarray | torch.Tensor, activation: Literal["softmax", "sigmoid"]) -> np.ndarray:
    """Probabilities from logits along the last axis."""
    t = torch.as_tensor(logits, dtype=torch.float32)
    if activation == "softmax":
        return t.softmax(-1).numpy()
    if activation == "sigmoid":
        return t.sigmoid().numpy()
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


def predict_probs(
    model: nn.Module, dataset: Dataset, *, device: torch.device | str, batch_size: int,
    tta_hflip: bool = True, activation: Literal["softmax", "sigmoid"] = "softmax", workers: int = 0,
) -> np.ndarray:
    """Class probabilities (N, C) in dataset order: the mean over TTA views of each view's probabilities.

    Probabilities, not logits, are averaged: that is what the fold ensemble averages too, so one
    model's two views and five models' views combine the same way.
    """
    activate(np.zeros((1, 1)), activation)  # fail on a bad activation before any work
    logits = predict_logits(model, dataset, device=device, batch_size=batch_size, views=tta_views(tta_hflip), workers=workers)
    return activate(logits, activation).mean(axis=0)
