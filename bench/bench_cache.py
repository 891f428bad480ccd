"""How much the preprocessing cache saves: images per second, cached vs decoding every time.

Runs on the shared real files (251 PNG chest radiographs + the chest DICOMs of the edge-case set),
at 512 and 256 px, in one process: uncached = ``read_image`` + resize + uint8 (what a loader
without the cache does per sample), cached = ``ImageCache.load``. Each figure is the median of
``--repeats`` passes over all files. Also times the raw cache format against ``.npy`` and PNG.

    python bench/bench_cache.py [--repeats 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr_noisy_student.datasets.cache import ImageCache, preprocess_image  # noqa: E402
from cxr_noisy_student.datasets.readers import read_image  # noqa: E402
from cxr_noisy_student.datasets.config import PreprocessConfig

SHARED = ROOT.parent / "shared" / "data"
CHEST_DICOMS = ["RG1_UNCI.dcm", "RG1_J2KI.dcm", "Fake_MONOHR1.dcm",
                "siim_acr_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"]


def shared_items() -> pd.DataFrame:
    pngs = sorted((SHARED / "cxr-covid-ieee8023" / "images").glob("*.png"))
    dicoms = [SHARED / "dicom-edge-cases" / name for name in CHEST_DICOMS]
    paths = [p for p in pngs + dicoms if p.exists()]
    return pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})


def rate(fn, items: pd.DataFrame, repeats: int) -> float:
    """Median images per second of ``fn(image_id, path)`` over all items."""
    pairs = list(zip(items["image_id"], items["path"]))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image_id, path in pairs:
            fn(image_id, path)
        seconds.append(time.perf_counter() - start)
    return len(pairs) / statistics.median(seconds)


def format_rates(cache: ImageCache, image_ids: list[str], folder: Path, repeats: int) -> dict[str, float]:
    """Images per second reading the same arrays as raw bytes (the cache), .npy and PNG."""
    arrays = {i: cache.load(i) for i in image_ids}
    for i, a in arrays.items():
        np.save(folder / f"{i}.npy", a)
        cv2.imwrite(str(folder / f"{i}.png"), a)
    items = pd.DataFrame({"image_id": image_ids, "path": image_ids})
    return {
        "raw (cache)": rate(lambda i, _: cache.load(i), items, repeats),
        "npy": rate(lambda i, _: np.load(folder / f"{i}.npy"), items, repeats),
        "png": rate(lambda i, _: cv2.imread(str(folder / f"{i}.png"), cv2.IMREAD_UNCHANGED), items, repeats),
    }


def bench_size(items: pd.DataFrame, size: int, root: Path, repeats: int, workers: int) -> None:
    preprocess = PreprocessConfig(size=size)
    cache = ImageCache(root, preprocess)
    failures = cache.build(items, workers=workers)
    if len(failures):
        print(failures.to_string(), file=sys.stderr)
    print(f"[{size}px] build of {len(items)} images with {workers} workers: {cache.last_stats.seconds:.2f} s")

    def uncached(_id, path):
        preprocess_image(read_image(path, percentile_clip=preprocess.percentile_clip), size=size)

    slow = rate(uncached, items, repeats)
    fast = rate(lambda image_id, _p: cache.load(image_id), items, repeats)
    print(f"[{size}px] uncached {slow:9.1f} img/s | cached {fast:9.1f} img/s | ratio {fast / slow:7.1f}x")
    with tempfile.TemporaryDirectory() as tmp:
        formats = format_rates(cache, list(items["image_id"]), Path(tmp), repeats)
    print(f"[{size}px] formats: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in formats.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    items = shared_items()
    n_dcm = int(items["path"].str.endswith(".dcm").sum())
    print(f"{len(items)} images ({len(items) - n_dcm} PNG, {n_dcm} DICOM), median of {args.repeats} passes")
    with tempfile.TemporaryDirectory() as root:
        for size in (512, 256):
            bench_size(items, size, Path(root), args.repeats, args.workers)


if __name__ == "__main__":
    main()
