"""The one place a device name becomes a ``torch.device``."""
from __future__ import annotations

import re

import torch

from ..datasets.errors import ConfigError

_NAMES = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """"auto"/None -> CUDA when available, else the CPU; "cpu", "cuda", "cuda:N" as given.

    Raises:
        ConfigError: a name that is not a device, or CUDA asked for on a machine without it (one
            line instead of torch's traceback deep inside the first model move).
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip()
    if not _NAMES.match(name):
        raise ConfigError(f"run.device {name!r}: not a device; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device {name!r}: CUDA is not available on this machine (use --device cpu)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"run.device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)
