"""Throughput of the WBF stage, serial vs parallel, against the detector inference that feeds it.

A cycle's fuse stage sees, per image, k folds x 2 TTA views = 10 prediction sets (k = 5) of up to
~100 boxes each (conf_floor is low on purpose). The target is fusion time <= 10% of inference time
for the same images; this script measures both on this machine and prints the ratios.

    python bench/bench_fusion.py                 # 200 images, 10 models x 100 boxes, 2 workers
    python bench/bench_fusion.py --images 50 --skip-inference
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from cxr_noisy_student.teacher_student.fusion import fuse_boxes  # noqa: E402


def synthetic_predictions(n_images: int, n_models: int, n_boxes: int, *, layout: str = "nms", n_classes: int = 3,
                          seed: int = 0) -> pd.DataFrame:
    """``n_boxes`` predictions per model and image around 8 objects, scores skewed low.

    layout "nms" (what detectors emit): candidates are jittered copies of the objects plus random
    background boxes, then per-class NMS at IoU 0.6 (as YOLO predict does) and the top ``n_boxes``
    by score. layout "dense": ``n_boxes`` jittered copies of the objects with no NMS, a worst case
    that makes every WBF cluster huge (WBF's cost grows with the square of the cluster size).
    """
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_images):
        centers, sizes = rng.uniform(0.15, 0.85, (8, 2)), rng.uniform(0.05, 0.25, (8, 2))
        classes = rng.integers(n_classes, size=8)
        for m in range(n_models):
            boxes, labels, scores = _model_boxes(rng, centers, sizes, classes, n_boxes, layout, n_classes)
            frames.append(pd.DataFrame({
                "image_id": f"img{i:04d}", "class_id": labels,
                "x_min": boxes[:, 0], "y_min": boxes[:, 1], "x_max": boxes[:, 2], "y_max": boxes[:, 3],
                "score": scores, "model": f"f{m // 2}/{'orig' if m % 2 == 0 else 'hflip'}",
            }))
    return pd.concat(frames, ignore_index=True)


def _model_boxes(rng, centers, sizes, classes, n_boxes, layout, n_classes):
    n_candidates = n_boxes if layout == "dense" else 4 * n_boxes
    n_object = n_candidates if layout == "dense" else n_candidates // 4
    pick = rng.integers(len(centers), size=n_object)
    c = np.clip(centers[pick] + rng.normal(0, 0.02, (n_object, 2)), 0.13, 0.87)
    half = np.clip(sizes[pick] * rng.uniform(0.8, 1.2, (n_object, 2)), 0.01, 0.25) / 2
    labels, scores = classes[pick], rng.beta(2.0, 2.0, n_object)
    if layout != "dense":  # background boxes anywhere, any class, low scores
        n_bg = n_candidates - n_object
        c = np.concatenate([c, rng.uniform(0.13, 0.87, (n_bg, 2))])
        half = np.concatenate([half, rng.uniform(0.01, 0.12, (n_bg, 2))])
        labels = np.concatenate([labels, rng.integers(n_classes, size=n_bg)])
        scores = np.concatenate([scores, rng.beta(0.5, 6.0, n_bg)])
    boxes = np.clip(np.concatenate([c - half, c + half], axis=1), 0, 1)
    scores = scores.clip(0.01, 1.0)
    if layout != "dense":
        import torch
        from torchvision.ops import batched_nms

        keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.6).numpy()
        keep = keep[:n_boxes]  # batched_nms returns indices by decreasing score
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    return boxes, labels, scores


def time_fusion(preds: pd.DataFrame, workers: int) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    fused = fuse_boxes(preds, iou_thr=0.55, skip_box_thr=0.01, workers=workers)
    return time.perf_counter() - start, fused


def time_yolo_inference(n_images: int, imgsz: int, batch: int) -> float:
    """One forward pass per image of an untrained yolov8n at imgsz on CPU (the model is built from YAML)."""
    from ultralytics import YOLO

    model = YOLO("yolov8n.yaml")
    rng = np.random.default_rng(0)
    images = [np.repeat(rng.integers(0, 256, (imgsz, imgsz, 1), dtype=np.uint8), 3, axis=2) for _ in range(batch)]
    model.predict(images[:1], imgsz=imgsz, conf=0.01, iou=0.6, device="cpu", verbose=False)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n_images:
        n = min(batch, n_images - done)
        model.predict(images[:n], imgsz=imgsz, conf=0.01, iou=0.6, device="cpu", verbose=False, batch=n)
        done += n
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--models", type=int, default=10, help="folds x TTA views")
    ap.add_argument("--boxes", type=int, default=100, help="boxes per model per image")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--imgsz", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layout", choices=["nms", "dense"], default="nms")
    ap.add_argument("--skip-inference", action="store_true")
    args = ap.parse_args(argv)

    preds = synthetic_predictions(args.images, args.models, args.boxes, layout=args.layout)
    serial_s, serial = time_fusion(preds, workers=0)
    parallel_s, parallel = time_fusion(preds, workers=args.workers)
    pd.testing.assert_frame_equal(serial, parallel)
    out = {
        "images": args.images, "layout": args.layout, "input_boxes": len(preds), "fused_boxes": len(serial),
        "fusion_serial_s": round(serial_s, 2), f"fusion_{args.workers}_workers_s": round(parallel_s, 2),
        "parallel_speedup": round(serial_s / parallel_s, 2), "ms_per_image_serial": round(1000 * serial_s / args.images, 1),
    }
    if not args.skip_inference:
        infer_s = time_yolo_inference(args.images, args.imgsz, args.batch)
        best = min(serial_s, parallel_s)
        out.update({
            "yolov8n_inference_s (1 pass/image)": round(infer_s, 2),
            "ratio fusion/inference (1 pass/image)": round(best / infer_s, 3),
            f"ratio fusion/inference ({args.models} passes/image)": round(best / (infer_s * args.models), 3),
        })
    for k, v in out.items():
        print(f"{k:>42}: {v}")
    return out


if __name__ == "__main__":
    main()
