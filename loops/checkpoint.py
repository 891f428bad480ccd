"""Model checkpoints that carry everything needed to use them.

A checkpoint is ``torch.save`` of plain types + tensors: ``{"format", "state_dict", "meta"}``. The
meta says which model to rebuild (name, classes, drop rates) and how its inputs were made
(``PreprocessConfig``: size, windowing percentiles, mean/std), so prediction never re-states the
preprocessing by hand: the most common silent failure in this field is a model fed images
prepared differently from those it was trained on.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..datasets.errors import DataError
from ..datasets.atomic import atomic_path
from ..datasets.config import PreprocessConfig

FORMAT = "cxr-noisy-student/classifier/1"
REQUIRED_META = ("model_name", "num_classes", "class_names", "preprocess", "activation")


class CheckpointError(DataError):
    """A checkpoint is missing, unreadable or does not fit its own model; the message is one line."""


def _plain(meta: dict) -> dict:
    """Meta as JSON types only (tuples -> lists, dataclasses -> dicts), so weights_only loading works."""
    meta = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in meta.items()}
    return json.loads(json.dumps(meta, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write the model weights and their meta atomically (a killed run never leaves half a file).

    ``meta`` must hold model_name, num_classes, class_names, preprocess (a ``PreprocessConfig`` or
    its dict), activation ("softmax"/"sigmoid"); usually also drop_rate, drop_path_rate,
    label_mode, ordinal_thresholds and the config that made the model.
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing} (required: {list(REQUIRED_META)})")
    meta = _plain(meta)
    preprocess_from_meta(meta)  # refuse to write a checkpoint whose preprocessing cannot be read back
    if len(meta["class_names"]) != meta["num_classes"]:
        raise ValueError(f"meta has {len(meta['class_names'])} class names for num_classes={meta['num_classes']}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "state_dict": state, "meta": meta}, tmp)
    return path


def safe_torch_load(path: str | Path, what: str, error: type[Exception] = DataError):
    """``torch.load(weights_only=True)`` of a file, any failure turned into one line naming it.

    The one place the engine reads torch files: tensors and plain containers only, never pickled
    code, so a checkpoint from outside the run cannot execute anything when loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:150]
        raise error(f"{path}: unreadable {what}, corrupt, truncated or not weights-only "
                    f"({type(err).__name__}: {first})") from None


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, checked for format and meta; CheckpointError names what is wrong."""
    path = Path(path)
    ckpt = safe_torch_load(path, "checkpoint", CheckpointError)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a classifier checkpoint of this engine (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_META if k not in ckpt.get("meta", {})]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {missing}")
    return ckpt


def load_model(path: str | Path, build: Callable[[dict], nn.Module],
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model its meta describes with ``build(meta)``, load the weights strictly, return
    (model in eval mode, meta). ``build`` raising ValueError (an unknown model name) becomes a
    CheckpointError naming the file."""
    ckpt = read_checkpoint(path)
    meta = ckpt["meta"]
    try:
        model = build(meta)
    except ValueError as err:
        raise CheckpointError(f"{path}: cannot rebuild the model: {err}") from None
    result = _load_strict(model, ckpt["state_dict"])
    if result:
        what = f"model {meta['model_name']!r} with {meta['num_classes']} classes"
        raise CheckpointError(f"{path}: weights do not fit {what} ({result})")
    return model.to(device).eval(), meta


def _load_strict(model: nn.Module, state: dict) -> str:
    """Load ``state``; return an empty string, or a short description of why it does not fit."""
    own = model.state_dict()
    shapes = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        groups = ((shapes, "shape mismatches"), (missing, "missing"), (unexpected, "unexpected"))
        parts = [f"{len(keys)} {what} e.g. {keys[0]}" for keys, what in groups if keys]
        return "; ".join(parts)
    model.load_state_dict(state, strict=True)
    return ""


def preprocess_from_meta(meta: dict, *, where: str | Path | None = None) -> PreprocessConfig:
    """The PreprocessConfig a checkpoint was trained with (the cache to read for it).

    ``where``: the checkpoint file, named in the error.
    """
    at = f"{where}: " if where else ""
    pp = meta.get("preprocess")
    if not isinstance(pp, dict) or not pp:
        raise CheckpointError(f"{at}checkpoint meta has no preprocess section (got {pp!r}): it predates checkpoints "
                              "that carry their preprocessing; retrain it")
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    unknown, missing = sorted(set(pp) - known), sorted(known - set(pp))
    if unknown or missing:  # defaults filling a gap would be exactly the silent mismatch to avoid
        raise CheckpointError(f"{at}checkpoint preprocess does not match PreprocessConfig (missing {missing}, "
                              f"unknown {unknown})")
    values = dict(pp)
    if "percentile_clip" in values:
        values["percentile_clip"] = tuple(float(v) for v in values["percentile_clip"])
    return PreprocessConfig(**values)
