"""Process environment the engine relies on (ground floor: imports nothing of the project).

The engine runs offline. ultralytics and albumentations read these variables when they are first
imported, so every package of the engine calls :func:`set_offline_defaults` in its ``__init__``,
before any module of it can import either library. A value the user set is kept.
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "YOLO_OFFLINE": "1",  # ultralytics: no online checks, no asset downloads
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version on import
    "YOLO_VERBOSE": "False",  # ultralytics' per-batch console output; the engine logs epochs itself
}


def set_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


ENTRY_SCRIPT = "run_cycle.py"


def entry_script() -> Path | None:
    """The command line that sits beside the engine's folders (a checkout, or an editable install),
    or None for an installed engine.

    Why worker processes need it: run from a checkout, the import root ``cxr_noisy_student`` exists
    only because the command line mapped it onto these folders; a fresh process (a spawned pool
    worker, a Ray worker, a torchrun rank) runs that script's top level to get the same mapping,
    and so imports this code rather than another installed copy.
    """
    script = Path(__file__).resolve().parents[1] / ENTRY_SCRIPT
    return script if script.is_file() and (script.parent / "teacher_student").is_dir() else None
