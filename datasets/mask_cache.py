"""The preprocessing cache of masks: decoded and resized once, beside the images they belong to.

Why nearest neighbour (``cv2.INTER_NEAREST_EXACT``, pixel-centre exact): a mask must stay binary
and must cover the same pixels as the image it labels after the same square resize; the images'
INTER_AREA averages and plain INTER_NEAREST samples half a source pixel off, which at 4x
downscaling moves a lung border by a pixel. The layout follows :mod:`datasets.cache`::

    root/<size>px-masks-v1/index.json   image_id -> key
    root/<size>px-masks-v1/<key>.u8     uint8 0/1, size*size bytes

A key hashes the mask's source (the file's path, size and mtime, or the RLE text) with the size and
the image's dimensions, so a changed mask is rebuilt and never served stale.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .atomic import atomic_path, read_json, write_json
from .errors import DataError
from .masks import load_mask

VERSION = 1
FAILURE_COLUMNS = ["image_id", "path", "problem"]


def resize_mask(mask: np.ndarray, *, size: int) -> np.ndarray:
    """0/1 (H, W) -> 0/1 (size, size), nearest neighbour at pixel centres (see the module docstring)."""
    return cv2.resize(np.asarray(mask, np.uint8), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)


def _key(row: dict, size: int) -> str:
    source = row["mask_path"]
    if source:
        st = os.stat(source)
        text = json.dumps([os.path.abspath(source), st.st_size, st.st_mtime_ns])
    else:
        text = hashlib.sha1(str(row["mask_rle"]).encode()).hexdigest()
    spec = json.dumps([text, size, int(row["width"]), int(row["height"]), VERSION])
    return hashlib.sha1(spec.encode()).hexdigest()[:20]


class MaskCache:
    """``uint8 (size, size)`` 0/1 masks keyed by image_id (items with ``mask_labeled``)."""

    def __init__(self, root: str | Path, size: int):
        self.size = int(size)
        self.dir = Path(root) / f"{self.size}px-masks-v{VERSION}"
        self._files: dict[str, str] | None = None

    def build(self, items: pd.DataFrame) -> pd.DataFrame:
        """Decode and store every mask-labeled item's mask not cached yet; return the failures
        (image_id, path, problem) for the caller to quarantine (a file changed since it was checked)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        index_path = self.dir / "index.json"
        index = read_json(index_path) if index_path.exists() else {}
        failures = []
        for row in items[items["mask_labeled"]].to_dict("records"):
            try:
                key = _key(row, self.size)
                if index.get(row["image_id"]) == key and (self.dir / f"{key}.u8").exists():
                    continue
                mask = load_mask(row["mask_path"], row["mask_rle"], width=int(row["width"]), height=int(row["height"]))
            except (OSError, ValueError) as exc:
                failures.append((row["image_id"], row["mask_path"] or "(rle)", f"mask unreadable: {exc}"))
                index.pop(row["image_id"], None)
                continue
            with atomic_path(self.dir / f"{key}.u8") as tmp:
                tmp.write_bytes(resize_mask(mask, size=self.size).tobytes())
            index[row["image_id"]] = key
        write_json(index_path, index)
        self._files = None
        return pd.DataFrame(failures, columns=FAILURE_COLUMNS)

    def load(self, image_id: str) -> np.ndarray:
        """The cached 0/1 mask of an image (a dict lookup and one read, like ``ImageCache.load``)."""
        if self._files is None:
            index_path = self.dir / "index.json"
            index = read_json(index_path) if index_path.exists() else {}
            self._files = {i: str(self.dir / f"{k}.u8") for i, k in index.items()}
        file = self._files.get(image_id)
        if file is None:
            raise DataError(f"{self.dir}: no cached mask for image {image_id!r} (not mask-labeled, or not built)")
        data = np.fromfile(file, dtype=np.uint8)
        if data.size != self.size * self.size:
            raise DataError(f"{file}: cached mask of image {image_id!r} has {data.size} bytes; rebuild")
        return data.reshape(self.size, self.size)
