"""Segmentation masks: run-length encoding, reading, validation, and attaching masks to the item table.

Masks come as a file per image (a PNG of 0 and 255, or 0 and 1, the size of the image) or run-length
encoded as in SIIM-ACR's ``train-rle.csv`` (``ImageId, EncodedPixels``; ``-1`` for an empty mask;
several rows per image = several instances, united here because the engine segments one class).
Inside the engine a mask is a ``uint8`` array of 0 and 1 of the image's own height x width; the
preprocessing cache (:mod:`datasets.mask_cache`) resizes it with nearest neighbour, so mask and
image stay aligned at every size.

Every mask row is checked like a box row: unknown image, missing file or one outside the data root,
wrong size, not binary, an unparsable or out-of-image run, an empty mask where the CSV says positive
(a ``positive`` column, or a ``*_fraction`` column stating the foreground fraction, which must also
match). A bad row goes through the :class:`~datasets.table.Quarantine` (one line naming the file and
the row), and its image is then not mask-labeled: its mask truth would be incomplete.

Item table columns (added by :func:`attach_masks`): ``mask_labeled`` (bool: the image's mask is
ground truth; False means "not annotated", not "empty"), ``mask_path`` (a mask file, or ''),
``mask_rle`` (the united mask as standard RLE, or ''), ``mask_instances`` (rows that drew it).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .errors import DataError

MASK_COLUMNS = ["mask_labeled", "mask_path", "mask_rle", "mask_instances"]
EMPTY_RLE = "-1"
"""SIIM-ACR's encoding of an empty mask."""
RLE_COLUMN = "EncodedPixels"
FILE_COLUMN = "mask_file"
ID_COLUMNS = ("image_id", "ImageId")
DEMO_MASKS, DEMO_TRUTH_MASKS = "masks.csv", "unlabeled_masks.csv"
"""The demo's mask files (``datasets.demo``, SIIM-ACR RLE): labeled + held-out images; the pool's hidden truth."""
FRACTION_TOLERANCE = 0.01
"""How far a CSV's stated foreground fraction may be from the file's (rounding in the CSV)."""


# ----------------------------------------------------------------------------- run-length encoding


def rle_encode(mask: np.ndarray, *, relative: bool = True) -> str:
    """A binary (H, W) mask as SIIM-ACR run-length text: "start length start length ...".

    Pixels are numbered column by column (SIIM-ACR's kernels transpose the image before encoding).
    ``relative`` (the format of SIIM-ACR's ``train-rle.csv`` and stage-1 submissions): each start is
    the number of pixels since the end of the previous run, 0-based. Otherwise the standard Kaggle
    encoding: absolute 1-based starts. An empty mask is ``-1``.
    """
    flat = np.asarray(mask).astype(bool).T.ravel()
    if not flat.any():
        return EMPTY_RLE
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    lengths = ends - starts
    if relative:
        starts = starts - np.concatenate([[0], ends[:-1]])
    else:
        starts = starts + 1
    return " ".join(f"{s} {n}" for s, n in zip(starts, lengths))


def rle_decode(text: str, *, height: int, width: int, relative: bool = True) -> np.ndarray:
    """Run-length text (see :func:`rle_encode`) -> uint8 (height, width) mask of 0/1.

    Raises:
        ValueError: text that is not pairs of non-negative integers, or runs outside the image
            (the message says which; callers put it on their one-line report).
    """
    text = str(text).strip()
    if text in (EMPTY_RLE, ""):
        return np.zeros((height, width), np.uint8)
    try:
        values = np.array([int(v) for v in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"run-length text is not integers: {text[:40]!r}") from None
    if len(values) % 2:
        raise ValueError(f"run-length text has an odd number of values ({len(values)}): start/length pairs expected")
    starts, lengths = values[0::2], values[1::2]
    if (values < 0).any() or (lengths == 0).any():
        raise ValueError("run-length text has a negative start or an empty run")
    if relative:
        starts = np.cumsum(starts + np.concatenate([[0], lengths[:-1]]))
    else:
        if (starts < 1).any():
            raise ValueError("absolute run starts are 1-based: a start of 0 is invalid")
        starts = starts - 1
    ends = starts + lengths
    if ends.max() > height * width:
        raise ValueError(f"a run ends at pixel {int(ends.max())}, beyond the {width}x{height} image")
    flat = np.zeros(height * width + 1, np.int32)
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return (np.cumsum(flat[:-1]) > 0).astype(np.uint8).reshape(width, height).T.copy()


# ----------------------------------------------------------------------------- files


def read_mask_file(path: str | Path, *, width: int, height: int) -> np.ndarray:
    """A mask image as uint8 0/1 of shape (height, width).

    Raises:
        ValueError: unreadable, wrong size, more than one channel with different values, or not
            binary (values other than 0 and one foreground value 1 or 255).
    """
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError("mask file cannot be decoded as an image")
    if raw.ndim == 3:
        if not all(np.array_equal(raw[..., 0], raw[..., c]) for c in range(1, min(raw.shape[2], 3))):
            raise ValueError(f"mask has {raw.shape[2]} channels that differ: expected a grey 0/255 mask")
        raw = raw[..., 0]
    if raw.shape != (height, width):
        raise ValueError(f"mask is {raw.shape[1]}x{raw.shape[0]} pixels, the image is {width}x{height}")
    values = np.unique(raw)
    if len(values) > 2 or not set(values.tolist()) <= {0, 1, 255} or {1, 255} <= set(values.tolist()):
        shown = values[:6].tolist()
        raise ValueError(f"mask is not binary: values {shown}{'...' if len(values) > 6 else ''} (expected 0 and 255, or 0 and 1)")
    return (raw > 0).astype(np.uint8)


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """A 0/1 mask as an 8-bit 0/255 PNG (the format :func:`read_mask_file` reads)."""
    ok, buf = cv2.imencode(".png", (np.asarray(mask) > 0).astype(np.uint8) * 255)
    if not ok:
        raise DataError(f"{path}: PNG encoding of a mask failed")
    Path(path).write_bytes(buf.tobytes())


def load_mask(path: str, rle: str, *, width: int, height: int) -> np.ndarray:
    """The mask of one item from its table columns (a file, else standard RLE)."""
    if path:
        return read_mask_file(path, width=width, height=height)
    return rle_decode(rle, height=height, width=width, relative=False)


def boxes_mask(boxes: np.ndarray, *, size: int) -> np.ndarray:
    """A (size, size) 0/1 mask filled inside normalized boxes: masks drawn from boxes (the
    SIIM-COVID19 winners' auxiliary target when no mask was drawn)."""
    mask = np.zeros((size, size), np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        c0, r0 = int(np.floor(x0 * size)), int(np.floor(y0 * size))
        c1, r1 = int(np.ceil(x1 * size)), int(np.ceil(y1 * size))
        mask[max(r0, 0):min(r1, size), max(c0, 0):min(c1, size)] = 1
    return mask
