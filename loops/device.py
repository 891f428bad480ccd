"""The one place a device name from the config becomes a ``torch.device``.

Why one place: a typo ("cdua", "gpu") or a CUDA device on a machine without one must fail at once
with one line naming the key and the value, not as a torch traceback deep inside the first
training step, minutes into a run.
"""
from __future__ import annotations

import re

import torch

from ..datasets.errors import ConfigError

_DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")


def check_device_name(device: str | None, *, key: str = "run.device") -> str | None:
    """Why a device name can never work on any machine (checked at config load), or None.

    Whether this machine has the CUDA device named is :func:`resolve_device`'s question, asked
    when the run starts: a saved config must still load on a machine without one (its report).
    """
    if device is None or str(device) == "auto" or _DEVICE_NAME.fullmatch(str(device)):
        return None
    return f"{key} {str(device)!r}: not a device; use auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None, *, key: str = "run.device") -> torch.device:
    """"auto"/None -> cuda when available, else cpu; "cpu", "cuda" and "cuda:N" as they are.

    Args:
        device: the configured device (a ``torch.device`` of type cpu or cuda is accepted too).
        key: the config key the value came from, named in the error.

    Raises:
        ConfigError: anything else, or a cuda device this machine does not have.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    problem = check_device_name(name, key=key)
    if problem:
        raise ConfigError(problem)
    resolved = torch.device(name)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} {name!r}: CUDA is not available on this machine; use auto or cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"{key} {name!r}: this machine has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}")
    return resolved
