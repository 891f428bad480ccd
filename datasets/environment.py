"""Process environment the engine relies on (ground floor: imports nothing of the project).

The engine runs offline. ultralytics and albumentations read these variables when they are first
imported, so every package of the engine calls :func:`set_offline_defaults` in its ``__init__``,
before any module of it can import either library. A value the user set is kept.
"""
from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "YOLO_OFFLINE": "1",  # ultralytics: no online checks, no asset downloads
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version on import
    "YOLO_VERBOSE": "False",  # ultralytics' per-batch console output; the engine logs epochs itself
}


def set_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
