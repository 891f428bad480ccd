"""Overhead of ``fit`` and ``predict_probs`` against bare timm loops on the same model and data.

Both sides see the same in-memory uint8 images (a dict behind ``load``) and the same model
architecture, in one process, alternating for ``--repeats`` rounds; the figure is the median ratio
of images per second (1.0 means no overhead; the target is >= 0.95).

- train, bare: stacked float tensors, forward + soft cross-entropy + backward + AdamW step.
- train, fit: ``fit`` with no validation set (its data loader, per-item normalization, LR
  schedule, gradient clipping, loss bookkeeping). Reported twice: the steps alone (the epoch's
  images/s) and wall clock, which adds precise-BN (``--precise-bn`` batches once at the end).
- predict, bare: eval-mode forward on stacked tensors under inference_mode, softmax.
- predict: ``predict_probs`` without TTA, and with hflip TTA (expected ratio ~0.5: two views).

    python bench/bench_loops.py [--model resnet10t] [--size 64] [--images 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timm.optim import create_optimizer_v2  # noqa: E402

from cxr_noisy_student.datasets.torch_data import ClassificationDataset  # noqa: E402
from cxr_noisy_student.loops.predict import predict_probs  # noqa: E402
from cxr_noisy_student.loops.train import fit, weighted_loss  # noqa: E402
from cxr_noisy_student.loops.config import TrainConfig
from cxr_noisy_student.teacher_student.models import create_classifier  # noqa: E402

MEAN, STD = 0.5, 0.25


def make_data(n: int, size: int, classes: int = 3):
    rng = np.random.default_rng(0)
    arrays = {f"img{i}": rng.integers(0, 256, (size, size), dtype=np.uint8) for i in range(n)}
    targets = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    return arrays, targets


def bare_train(name: str, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> float:
    torch.manual_seed(0)
    model = create_classifier(name, y.shape[1]).train()
    opt = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    w = torch.ones(cfg.batch_size)
    steps = len(x) // cfg.batch_size
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x))
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = weighted_loss(model(x[idx]), y[idx], w, kind="softmax")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return cfg.epochs * steps * cfg.batch_size / (time.perf_counter() - start)


def engine_train(name: str, ds: ClassificationDataset, cfg: TrainConfig, precise_bn: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_classifier(name, ds.num_classes)
    start = time.perf_counter()
    result = fit(model, ds, None, cfg, loss="softmax", device="cpu", log=lambda s: None, precise_bn_batches=precise_bn)
    wall = time.perf_counter() - start
    steps_only = statistics.mean(h["images_per_s"] for h in result.history)
    return steps_only, cfg.epochs * (len(ds) // cfg.batch_size) * cfg.batch_size / wall


@torch.inference_mode()
def bare_predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    model.eval()
    start = time.perf_counter()
    out = [model(x[i:i + batch_size]).softmax(-1) for i in range(0, len(x), batch_size)]
    torch.cat(out).numpy()
    return len(x) / (time.perf_counter() - start)


def engine_predict(model: torch.nn.Module, ds: ClassificationDataset, batch_size: int, tta: bool) -> float:
    start = time.perf_counter()
    predict_probs(model, ds, device="cpu", batch_size=batch_size, tta_hflip=tta)
    return len(ds) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precise-bn", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arrays, targets = make_data(args.images, args.size)
    ids = list(arrays)
    ds = ClassificationDataset(arrays.__getitem__, ids, targets, None, None, MEAN, STD)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.from_numpy(targets)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=0.5, workers=0)
    model = create_classifier(args.model, targets.shape[1])
    rows: dict[str, list[float]] = {k: [] for k in ("bare train", "fit steps", "fit wall", "bare predict", "predict", "predict tta")}
    for _ in range(args.repeats):
        rows["bare train"].append(bare_train(args.model, x, y, cfg))
        steps, wall = engine_train(args.model, ds, cfg, args.precise_bn)
        rows["fit steps"].append(steps)
        rows["fit wall"].append(wall)
        rows["bare predict"].append(bare_predict(model, x, args.batch_size))
        rows["predict"].append(engine_predict(model, ds, args.batch_size, tta=False))
        rows["predict tta"].append(engine_predict(model, ds, args.batch_size, tta=True))
    print(f"{args.model} at {args.size} px, {args.images} images, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats} rounds")
    for name, base in (("fit steps", "bare train"), ("fit wall", "bare train"), ("predict", "bare predict"), ("predict tta", "bare predict")):
        ratios = [a / b for a, b in zip(rows[name], rows[base])]
        print(f"{name:12s} {statistics.median(rows[name]):8.0f} img/s vs {base:12s} {statistics.median(rows[base]):8.0f} img/s"
              f"  ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
