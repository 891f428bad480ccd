"""The preprocessing cache: decode, window and resize every image once, then load it fast.

Why: decoding a 2000 x 2000 JPEG 2000 DICOM takes a quarter of a second; a cycle trains k folds x
several epochs x several generations over the same images. So each image is decoded once per
(source file, preprocessing parameters) and stored as the exact ``uint8 (size, size)`` array the
models read.

Layout (one directory per preprocessing fingerprint, so changing ``size`` never mixes sizes)::

    root/<size>px-<fingerprint>/
        index.json           image_id -> source key, source path, width, height, pixel_hash, phash
        <key>.u8             raw uint8 bytes, size*size, row-major (no header)
        png/<key>.png        written on demand by ``path_of`` for tools that need image files

Storage format, measured (512 x 512 uint8 on this machine): raw bytes read with ``readinto``
20 us, ``np.load`` of a ``.npy`` 110 us, ``cv2.imread`` of a PNG 1.7 ms. The shape needs no header
because the directory's fingerprint fixes it; a file of the wrong length is reported, not reshaped.

The key of an image is a hash of (absolute path, file size, mtime_ns, preprocessing parameters,
reader version): touching or replacing a source file, or changing the parameters, rebuilds it;
reruns and later cycles reuse it. Files are content-addressed by that key, so a stale file can
never be served for a changed source.

Writes are atomic (temporary file + ``os.replace``): a killed build leaves at worst a temporary
file, which the next build ignores and removes once it is older than ``STALE_TEMP_SECONDS``, and
images finished before the kill are reused if the index was flushed (every ``FLUSH_SECONDS`` and at
the end). One builder per cache directory at a time is the intended use; two at once stay correct
but may redo work.

Hashes kept per image, for duplicate-aware folds (``datasets.folds``):

``pixel_hash``
    sha1 of the decoded, normalised source image at native resolution (before resizing), quantised
    to uint16 so float rounding noise cannot split identical images; its shape is hashed too.
    Only true copies match: a re-encoded copy (cxr_0132 / cxr_0208 in the shared set differ by up
    to 7 grey levels in 60 % of pixels) has another pixel_hash and the same phash.
``phash``
    64-bit DCT perceptual hash of the source image (32x32 area-resampled, the 8x8 lowest DCT
    frequencies compared with their median), as a 16-character lowercase hex string (strings
    survive CSV round trips; ints above 2**63 do not). ``phash_distance(a, b)`` is the Hamming
    distance. Why DCT and not a difference hash: on the shared set a dHash puts unrelated films
    at distance 0-1 (cxr_0013/cxr_0196), so no threshold separates copies from strangers; the DCT
    hash puts the re-encoded copies at 0, the near-duplicate pair cxr_0073/0074 at 2 and the
    closest unrelated pair at 6 (``FoldConfig.phash_max_distance`` defaults to 4).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from scipy.fft import dctn
import pandas as pd

from .readers import READER_VERSION, read_image
from .errors import DataError
from .progress import Progress
from .atomic import atomic_path, read_json, write_json
from .config import PreprocessConfig, fingerprint

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
STALE_TEMP_SECONDS = 300.0
"""A temporary file older than this belongs to a killed writer (a live one holds it for milliseconds)."""
FLUSH_SECONDS = 60.0
"""During a long build the index is saved this often, so a kill loses at most this much work."""
FAILURE_COLUMNS = ["image_id", "path", "problem"]
HASH_COLUMNS = ["image_id", "pixel_hash", "phash"]


@dataclass(frozen=True)
class BuildStats:
    """What the last ``build`` did: images decoded now, reused from the cache, and failed."""

    decoded: int
    reused: int
    failed: int
    seconds: float


# ---------------------------------------------------------------------------- pure helpers


def preprocess_image(image: np.ndarray, *, size: int) -> np.ndarray:
    """float [0, 1] ``H x W`` -> uint8 ``(size, size)``: INTER_AREA resize, aspect ratio not kept.

    Not keeping the aspect ratio is the engine's convention: normalized boxes stay valid unchanged.
    Resizing before quantising keeps the averaging of INTER_AREA at float precision.
    """
    resized = cv2.resize(image.astype(np.float32, copy=False), (size, size), interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def pixel_hash(image: np.ndarray) -> str:
    """sha1 of an image in [0, 1] quantised to uint16 (with its shape): equal pixels, equal hash."""
    quantised = np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype("<u2")
    digest = hashlib.sha1(np.asarray(quantised.shape, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(quantised).tobytes())
    return digest.hexdigest()


def dhash(image: np.ndarray) -> str:
    """64-bit difference hash as 16 hex chars: is each of 8x8 cells brighter than its left neighbour."""
    small = cv2.resize(np.asarray(image, dtype=np.float32), (9, 8), interpolation=cv2.INTER_AREA)
    bits = small[:, 1:] > small[:, :-1]
    return np.packbits(bits.ravel()).tobytes().hex()


def dct_phash(image: np.ndarray) -> str:
    """64-bit DCT perceptual hash as 16 hex chars (see the module docstring for why DCT)."""
    small = cv2.resize(np.asarray(image, dtype=np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = dctn(small.astype(np.float64), norm="ortho")[:8, :8]
    return np.packbits((low > np.median(low)).ravel()).tobytes().hex()


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex dHashes (0: same structure, 64: opposite)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def source_key(path: str | Path, params: dict) -> str:
    """Cache key of one source file under given parameters; raises FileNotFoundError if missing."""
    absolute = os.path.abspath(path)
    st = os.stat(absolute)
    text = json.dumps([absolute, st.st_size, st.st_mtime_ns, params], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------- the cache


class ImageCache:
    """Preprocessed ``uint8 (size, size)`` images keyed by image_id, built once, loaded fast.

    Args:
        root: cache root; the images live in ``root/<size>px-<fingerprint>/``.
        preprocess: the preprocessing section of the config (``size`` and ``percentile_clip`` are
            used; ``mean``/``std`` apply later, when the float tensor is made, so they do not key
            the cache).
    """

    def __init__(self, root: str | Path, preprocess: PreprocessConfig):
        self.preprocess = preprocess
        self.size = int(preprocess.size)
        if self.size < 8:
            raise ValueError(f"preprocess.size must be at least 8 pixels, got {self.size}")
        self.params = {
            "size": self.size,
            "percentile_clip": [float(v) for v in preprocess.percentile_clip],
            "resize": "cv2.INTER_AREA",
            "reader": READER_VERSION,
        }
        self.dir = Path(root) / f"{self.size}px-{fingerprint(self.params)}"
        self.last_stats: BuildStats | None = None
        self._index: dict[str, dict] | None = None
        self._files: dict[str, str] | None = None

    # ------------------------------------------------------------------ build
    def build(self, items: pd.DataFrame, workers: int = 0) -> pd.DataFrame:
        """Decode and store every image not already cached; return the ones that failed.

        Args:
            items: a table with ``image_id`` and ``path`` columns (other columns are ignored).
            workers: processes for decoding; 0 or 1 decodes inline (no process start-up cost).

        Returns:
            ``failures``: one row per image that could not be cached (image_id, path, problem;
            the problem without the path, which has its own column), for the caller to
            quarantine. Problems are returned, not raised, so that one bad file does not stop a
            15 000 image build; a failed image also leaves the index, so a stale copy is never
            served. ``self.last_stats`` says what was done.
        """
        start = time.perf_counter()
        pairs = _item_pairs(items)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        index = dict(self._read_index())
        old_keys = {e["key"] for e in index.values()}
        todo, failures, reused = self._plan(pairs, index)
        try:
            failures += self._decode_all(todo, index, workers)
        finally:  # also on Ctrl-C or a crash: keep what was finished
            self._write_index(index)
        self._remove_files(old_keys - {e["key"] for e in index.values()})
        self.last_stats = BuildStats(len(todo), reused, len(failures), round(time.perf_counter() - start, 3))
        return pd.DataFrame(failures, columns=FAILURE_COLUMNS)

    def _plan(self, pairs: list[tuple[str, str]], index: dict) -> tuple[list, list, int]:
        """Split images into (to decode, unreadable sources, count reused); a stat per image, no decode."""
        todo, failures, reused = [], [], 0
        for image_id, path in pairs:
            try:
                key = source_key(path, self.params)
            except OSError as exc:
                problem = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read the file ({exc})"
                failures.append((image_id, path, problem))
                index.pop(image_id, None)
                continue
            entry = index.get(image_id)
            if entry and entry["key"] == key and self._file(key).exists():
                reused += 1
            else:
                todo.append((image_id, path, key))
        return todo, failures, reused

    def _decode_all(self, todo: list[tuple[str, str, str]], index: dict, workers: int) -> list[tuple]:
        """Run the decodes (inline or in a process pool), updating ``index`` as results arrive."""
        failures: list[tuple] = []
        last_flush = time.monotonic()
        clip = tuple(self.params["percentile_clip"])
        tasks = [(path, str(self._file(key)), self.size, clip) for _, path, key in todo]
        with Progress(len(tasks), f"cache {self.size}px", "img") as bar:
            for (image_id, path, key), result in zip(todo, _map(_build_one, tasks, workers)):
                bar.update()
                if "problem" in result:
                    failures.append((image_id, path, result["problem"]))
                    index.pop(image_id, None)
                    continue
                index[image_id] = {"key": key, "path": os.path.abspath(path), **result}
                if time.monotonic() - last_flush > FLUSH_SECONDS:
                    self._write_index(index)
                    last_flush = time.monotonic()
        return failures

    # ------------------------------------------------------------------ hot path
    def load(self, image_id: str) -> np.ndarray:
        """The cached ``uint8 (size, size)`` image. Called per sample in training: a dict lookup
        and one ``readinto`` (no pandas, no JSON), about 20 us at 512 px."""
        files = self._files if self._files is not None else self._load_files()
        try:
            file = files[image_id]
        except KeyError:
            raise DataError(f"{self.dir}: image {image_id!r} is not in the cache (build it first)") from None
        out = np.empty((self.size, self.size), dtype=np.uint8)
        try:
            with open(file, "rb", buffering=0) as f:
                n = f.readinto(memoryview(out).cast("B"))
        except OSError as exc:
            raise DataError(f"{file}: cache file of image {image_id!r} unreadable ({exc.strerror}); rebuild") from None
        if n != out.size:
            raise DataError(f"{file}: cache file of image {image_id!r} has {n} bytes, expected {out.size}; rebuild")
        return out

    # ------------------------------------------------------------------ tables and files
    def info(self) -> pd.DataFrame:
        """One row per cached image: image_id, path (source), width, height (source pixels), hashes."""
        rows = [{"image_id": image_id, **entry} for image_id, entry in self._cached_index().items()]
        columns = ["image_id", "path", "width", "height", "pixel_hash", "phash", "key"]
        return pd.DataFrame(rows, columns=columns)

    def hashes(self, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """``[image_id, pixel_hash, phash]`` (both hex strings, see the module docstring)."""
        table = self.info()[HASH_COLUMNS]
        if image_ids is not None:
            table = table[table["image_id"].isin(set(image_ids))]
        return table.reset_index(drop=True)

    def export_png(self, image_id: str, dest: str | Path) -> Path:
        """Write the cached image as an 8-bit grey PNG at ``dest`` (atomically)."""
        ok, buf = cv2.imencode(".png", self.load(image_id))
        if not ok:
            raise DataError(f"{dest}: PNG encoding failed for image {image_id!r}")
        with atomic_path(dest) as tmp:
            tmp.write_bytes(buf.tobytes())
        return Path(dest)

    def path_of(self, image_id: str) -> Path:
        """A PNG of the cached image for tools that read files (ultralytics YOLO, viewers).

        Written on first request into ``png/<key>.png`` and reused: PNGs cost 1.7 ms to read
        against 20 us for the raw cache, and most images never need one, so they are not written
        at build time. The name is the content key, so it changes when the source changes;
        exporters that need ``<image_id>.png`` should link or copy it under that name.
        """
        key = self._entry(image_id)["key"]
        dest = self.dir / "png" / f"{key}.png"
        if not dest.exists():
            self.export_png(image_id, dest)
        return dest

    # ------------------------------------------------------------------ internals
    def _file(self, key: str) -> Path:
        return self.dir / f"{key}.u8"

    def _entry(self, image_id: str) -> dict:
        entry = self._cached_index().get(image_id)
        if entry is None:
            raise DataError(f"{self.dir}: image {image_id!r} is not in the cache (build it first)")
        return entry

    def _load_files(self) -> dict[str, str]:
        self._files = {image_id: str(self._file(e["key"])) for image_id, e in self._cached_index().items()}
        return self._files

    def _cached_index(self) -> dict[str, dict]:
        """The index as last read or written by this object (read once, not per call)."""
        if self._index is None:
            self._index = self._read_index()
        return self._index

    def _read_index(self) -> dict[str, dict]:
        path = self.dir / INDEX_NAME
        if not path.exists():
            return {}
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable cache index (%s); rebuilding every image", path, exc)
            return {}
        if data.get("version") != INDEX_VERSION:
            return {}
        return data.get("images", {})

    def _write_index(self, index: dict) -> None:
        write_json(self.dir / INDEX_NAME, {"version": INDEX_VERSION, "params": self.params, "images": index})
        self._index, self._files = dict(index), None

    def _remove_files(self, keys: set[str]) -> None:
        """Delete the files of keys no image uses any more (sources that changed or failed)."""
        for key in keys:
            self._file(key).unlink(missing_ok=True)
            (self.dir / "png" / f"{key}.png").unlink(missing_ok=True)

    def _remove_stale_temps(self) -> None:
        """Delete temporary files left by killed writers (never read: the index names no temp)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for folder in (self.dir, self.dir / "png"):
            for tmp in folder.glob(".*.tmp"):
                try:
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()
                except FileNotFoundError:
                    pass


# ---------------------------------------------------------------------------- workers


def _item_pairs(items: pd.DataFrame) -> list[tuple[str, str]]:
    missing = [c for c in ("image_id", "path") if c not in items.columns]
    if missing:
        raise DataError(f"cache build: items table lacks columns {missing}")
    ids = items["image_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"cache build: duplicated image_id {dup.iloc[0]!r}")
    return list(zip(ids, items["path"].astype(str)))


def _build_one(task: tuple[str, str, int, tuple[float, float]]) -> dict:
    """Decode one source, write its cache file atomically, return its hashes (or its problem).

    Only DataError (a problem with the file) becomes a failure; anything else (disk full, a bug)
    propagates, because quarantining every image for an environment problem would hide it.
    """
    path, out_file, size, percentile_clip = task
    try:
        image = read_image(path, percentile_clip=percentile_clip)
    except DataError as exc:
        message = str(exc)
        for prefix in (f"{path}: ", f"{Path(path)}: "):
            if message.startswith(prefix):
                return {"problem": message[len(prefix):]}
        return {"problem": message}
    small = preprocess_image(image, size=size)
    with atomic_path(out_file) as tmp:
        with open(tmp, "wb") as f:
            f.write(small.tobytes())
    height, width = image.shape
    return {"width": int(width), "height": int(height), "pixel_hash": pixel_hash(image), "phash": dct_phash(image)}


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism; nested threads would oversubscribe


def _map(fn, tasks: list, workers: int) -> Iterator[dict]:
    """Results in task order, inline for workers <= 1, else from a process pool.

    forkserver rather than fork: the caller may hold threads (torch, cv2) that fork would copy
    in an undefined state.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    chunk = max(1, min(16, len(tasks) // (workers * 4)))
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        yield from pool.map(fn, tasks, chunksize=chunk)
