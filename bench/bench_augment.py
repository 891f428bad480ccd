"""Augmentation cost on the cached path: images per second per core at 512 px.

Builds the preprocessing cache of the 251 real PNG radiographs in ../shared/data, then times
``ClassificationDataset[i]`` (cache load -> transform -> normalized float tensor) for each role's
transform, in one process on one core (OpenCV and torch limited to one thread). The baseline is the
same dataset without augmentation; every other figure is printed as a ratio to it. Also times each
RandAugment op alone, which is what limits the student path.

    python bench/bench_augment.py [--size 512] [--repeats 3]
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import albumentations as A  # noqa: E402

from cxr_noisy_student.augment.transforms import _ops, apply_detection, detection_transform, student_transform, teacher_transform  # noqa: E402
from cxr_noisy_student.datasets.cache import ImageCache  # noqa: E402
from cxr_noisy_student.datasets.torch_data import ClassificationDataset  # noqa: E402
from cxr_noisy_student.datasets.config import PreprocessConfig

SHARED = ROOT.parent / "shared" / "data" / "cxr-covid-ieee8023"


def rate(fn, n: int, repeats: int) -> float:
    """Median images per second of ``fn(i)`` for i in range(n)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        seconds.append(time.perf_counter() - start)
    return n / statistics.median(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    paths = sorted((SHARED / "images").glob("*.png"))
    items = pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths]})
    pp = PreprocessConfig(size=args.size)
    with tempfile.TemporaryDirectory() as root:
        cache = ImageCache(root, pp)
        cache.build(items, workers=2)
        ids = list(items["image_id"])
        targets = np.zeros((len(ids), 3), np.float32)

        def dataset(transform):
            ds = ClassificationDataset(cache.load, ids, targets, None, transform, pp.mean, pp.std)
            if transform is not None:
                ds.reseed(0)
            return ds

        base_ds = dataset(None)
        print(f"{len(ids)} cached radiographs at {args.size} px, one core, median of {args.repeats} passes")
        load_only = rate(lambda i: cache.load(ids[i]), len(ids), args.repeats)
        base = rate(base_ds.__getitem__, len(ids), args.repeats)
        print(f"{'cache load only':34s} {load_only:8.0f} img/s  ratio {load_only / base:5.2f}")
        print(f"{'baseline: load + to tensor':34s} {base:8.0f} img/s  ratio  1.00")
        roles = {
            "teacher (flip, light affine, B/C)": teacher_transform(args.size),
            "student n=2 m=9": student_transform(args.size, 2, 9),
            "student n=2 m=15": student_transform(args.size, 2, 15),
            "student n=3 m=15": student_transform(args.size, 3, 15),
        }
        for name, transform in roles.items():
            r = rate(dataset(transform).__getitem__, len(ids), args.repeats)
            print(f"{name:34s} {r:8.0f} img/s  ratio {r / base:5.2f}")
        boxes, class_ids = np.array([[0.1, 0.2, 0.45, 0.8], [0.55, 0.2, 0.9, 0.8]], np.float32), np.array([0, 1])
        det = detection_transform(args.size, 2, 9, seed=0)
        r = rate(lambda i: apply_detection(det, cache.load(ids[i]), boxes, class_ids), len(ids), args.repeats)
        print(f"{'detection n=2 m=9 (uint8 out)':34s} {r:8.0f} img/s  ratio {r / base:5.2f}")
        print("\nRandAugment ops alone at m=15 (ms per image, on the cached arrays):")
        arrays = [cache.load(i) for i in ids[:64]]
        for op in _ops(15, boxes=False):
            t = A.Compose([op], seed=0)
            ms = 1000 / rate(lambda i: t(image=arrays[i % len(arrays)]), len(arrays), args.repeats)
            print(f"  {op.__class__.__name__:26s} {ms:6.3f} ms  {_detail(op)}")


def _detail(op) -> str:
    for key in ("rotate", "shear", "translate_percent", "scale"):
        value = getattr(op, key, None)
        if value is not None and value not in ((0.0, 0.0), {"x": (0.0, 0.0), "y": (0.0, 0.0)}, (1.0, 1.0)):
            return key
    return ""


if __name__ == "__main__":
    main()
