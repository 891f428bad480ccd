"""The segmentation model factory: segmentation_models_pytorch over a timm encoder, one input channel.

Why smp: Unet / FPN / Unet++ decoders over any timm encoder (``tu-<name>``) are what the SIIM-ACR
and SIIM-COVID19 solutions used, kept by a well-maintained library; a hand-written U-Net would be a
third copy of what it does. Models are built with ``encoder_weights=None`` (no download) and one
input channel. Student noise: stochastic depth inside the timm encoder (``drop_path_rate``, passed
through to ``timm.create_model``) and dropout before the segmentation head.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..datasets.errors import ConfigError
from ..loops.checkpoint import load_model

SEG_CLASS_NAMES = ("mask",)


def parse_spec(spec: str) -> tuple[str, str]:
    """'Unet:tu-resnet18' -> ('Unet', 'tu-resnet18'); one line naming the problem otherwise."""
    arch, sep, encoder = str(spec).partition(":")
    if not sep or not arch or not encoder:
        raise ConfigError(f"segmenter.ladder entry {spec!r}: write 'Arch:encoder', e.g. 'Unet:tu-resnet18'")
    return arch, encoder


def create_segmenter(spec: str, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                     decoder_channels: tuple[int, ...] = ()) -> nn.Module:
    """An smp model from a ladder entry, one input channel, one output (logits, same size as the input)."""
    import segmentation_models_pytorch as smp

    arch, encoder = parse_spec(spec)
    kwargs = {"drop_path_rate": drop_path_rate} if drop_path_rate and encoder.startswith("tu-") else {}
    if decoder_channels:
        kwargs["decoder_channels"] = tuple(int(c) for c in decoder_channels)
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=1, classes=1, **kwargs)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"segmenter {spec!r} cannot be built: {str(err).strip().splitlines()[0][:200]}") from None
    if drop_rate > 0:
        model.segmentation_head = nn.Sequential(nn.Dropout2d(drop_rate), *model.segmentation_head)
    return model


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A segmenter checkpoint rebuilt from its own meta (spec and noise), in eval mode."""
    return load_model(path, lambda meta: create_segmenter(
        meta["model_name"], drop_rate=meta.get("drop_rate", 0.0), drop_path_rate=meta.get("drop_path_rate", 0.0),
        decoder_channels=tuple(meta.get("decoder_channels") or ())), device)
