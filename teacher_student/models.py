"""timm classifier factory: one input channel, optional noise, three ways to initialise.

Radiographs are single-channel, so every model is built with ``in_chans=1`` (timm sums the RGB
filters of the first convolution when it loads 3-channel weights; we do the same for local state
dicts). Noise for students (dropout before the head, stochastic depth) is set here, at build time,
because timm wires it into the blocks.
"""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from ..datasets.errors import DataError
from ..loops.checkpoint import load_model, safe_torch_load

log = logging.getLogger(__name__)

TINY_LADDER = ("test_efficientnet", "mobilenetv3_small_050", "mobilenetv4_conv_small", "efficientnet_b0")
"""A four-rung ladder that trains at 64 px on a CPU in seconds (demo and tests); each rung is larger
than the one before and all of them support stochastic depth. Production ladders live in the
config (``ClassifierConfig.ladder``)."""


def create_classifier(
    name: str,
    num_classes: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: str = "",
) -> nn.Module:
    """Build a timm classifier with one input channel.

    Args:
        name: any timm model name (``timm.list_models()``).
        num_classes: size of the classification head.
        drop_rate: dropout before the classifier (student noise).
        drop_path_rate: stochastic depth; models without it (VGG, DenseNet...) log a warning and
            are built without it rather than failing, since the rest of the noise still applies.
        pretrained: "" random init (the default: tests and the demo run offline); "timm" timm's
            own weights (downloads); any other value is the path of a local state dict or checkpoint.

    Raises:
        ValueError: unknown model name (with a "did you mean" hint) or bad num_classes.
        DataError: the weights file is missing or unreadable.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    # timm drops kwargs that are None, so an unused noise setting is never passed at all.
    noise = {"drop_rate": drop_rate or None, "drop_path_rate": drop_path_rate or None}
    model = _build(name, num_classes=num_classes, pretrained=pretrained == "timm", **noise)
    if pretrained not in ("", "timm"):
        load_weights(model, pretrained)
    return model


def _build(name: str, *, num_classes: int, pretrained: bool, **noise: float | None) -> nn.Module:
    """timm.create_model, retried without any noise kwarg the model class does not accept."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=1, **noise)
    except TypeError as err:
        rejected = [k for k, v in noise.items() if v is not None and k in str(err)]
        if not rejected:
            raise
        log.warning("%s does not support %s; built without it", name, ", ".join(rejected))
        kept = {k: v for k, v in noise.items() if k not in rejected}
        return _build(name, num_classes=num_classes, pretrained=pretrained, **kept)
    except Exception as err:  # network or hub failures when pretrained weights are requested
        if not pretrained:
            raise
        raise RuntimeError(f"could not get timm pretrained weights for {name!r} (is there network access?): {err}") from err


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict (or a checkpoint holding one) into ``model``, leniently.

    Why lenient: a state dict from ImageNet training or from a teacher with another head is the
    normal case. A 3-channel first convolution is summed to one channel (as timm does), tensors
    whose shape differs (the head) are skipped, and one log line says what did not load.
    """
    
    path = Path(path)
    state = safe_torch_load(path, "pretrained weights file (a torch state dict)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: holds a {type(state).__name__} that is not a state dict of tensors")
    own = model.state_dict()
    first_conv = f"{model.pretrained_cfg.get('first_conv', '')}.weight"
    kept, skipped = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in own and own[key].shape != value.shape:
            if key == first_conv and value.ndim == 4:
                value = adapt_input_conv(own[key].shape[1], value)
            else:
                skipped.append(key)
                continue
        kept[key] = value
    if not set(kept) & set(own):
        raise DataError(f"{path}: none of its {len(state)} tensor names belong to this model (another architecture?)")
    result = model.load_state_dict(kept, strict=False)
    # a new head is expected (skipped for shape); anything else missing or extra deserves a warning
    level = logging.WARNING if set(result.missing_keys) - set(skipped) or result.unexpected_keys else logging.INFO
    log.log(
        level, "loaded %s: %d tensors, %d missing %s, %d unexpected %s, %d skipped for shape %s",
        path, len(kept) - len(result.unexpected_keys), len(result.missing_keys), result.missing_keys[:3],
        len(result.unexpected_keys), result.unexpected_keys[:3], len(skipped), skipped[:3],
    )


class AuxMaskClassifier(nn.Module):
    """A timm classifier with a light auxiliary decoder head on its last feature map (the
    SIIM-COVID19 winners' segmentation auxiliary loss): conv 3x3 + BN + ReLU + conv 1x1 to one mask
    channel, upsampled bilinearly to the input. ``forward`` is the plain classifier (prediction,
    validation, precise BN never see the head); ``forward_aux`` gives (class logits, mask logits)
    for the training loss (``loops.train.ClassifierTrainer.aux_forward``). Only ``net`` is saved
    (:func:`plain_classifier`): the checkpoint is an ordinary classifier's."""

    def __init__(self, classifier: nn.Module, *, aux_weight: float, width: int = 32):
        super().__init__()
        self.net, self.aux_weight = classifier, float(aux_weight)
        channels = classifier.num_features
        self.mask_head = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                       nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.forward_features(x)
        mask = nn.functional.interpolate(self.mask_head(features), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)
        return self.net.forward_head(features), mask


def plain_classifier(model: nn.Module) -> nn.Module:
    """The timm classifier inside an :class:`AuxMaskClassifier` (the model itself otherwise)."""
    return model.net if isinstance(model, AuxMaskClassifier) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A classifier checkpoint rebuilt from its own meta (model name, classes, noise), in eval mode."""
    return load_model(path, lambda meta: create_classifier(
        meta["model_name"], int(meta["num_classes"]), drop_rate=meta.get("drop_rate", 0.0),
        drop_path_rate=meta.get("drop_path_rate", 0.0)), device)
