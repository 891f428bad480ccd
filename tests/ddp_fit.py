"""One fit of a tiny real model, for the DDP test: run plainly (one process) or under torchrun.

    python tests/ddp_fit.py OUT.pt [seed]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_fit.py OUT.pt

The model has no BatchNorm (GroupNorm instead): on the CPU each rank would normalise by its own
share of the batch, which is a different model, not a rounding difference. Rank 0 saves the
weights and the history.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import run_cycle  # noqa: E402,F401  maps the import root onto this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cxr_noisy_student.datasets.torch_data import ClassificationDataset  # noqa: E402
from cxr_noisy_student.loops import distributed  # noqa: E402
from cxr_noisy_student.loops.config import TrainConfig  # noqa: E402
from cxr_noisy_student.loops.train import fit  # noqa: E402

N_TRAIN, N_VAL, SIZE, CLASSES = 40, 12, 16, 3


def dataset(rng: np.random.Generator, n: int, *, weighted: bool) -> ClassificationDataset:
    images = {f"img{i}": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for i in range(n)}
    targets = np.eye(CLASSES, dtype=np.float32)[rng.integers(CLASSES, size=n)]
    weights = np.where(np.arange(n) % 4 == 0, 0.5, 1.0).astype(np.float32) if weighted else None  # "pseudo labels"
    return ClassificationDataset(images.__getitem__, list(images), targets, weights, None, 0.5, 0.25)


def main(out: str, seed: int = 3) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))
    rng = np.random.default_rng(0)
    train_ds, val_ds = dataset(rng, N_TRAIN, weighted=True), dataset(rng, N_VAL, weighted=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, CLASSES))
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_epochs=0.5, amp=False, grad_clip=1.0)
    result = fit(model, train_ds, val_ds, cfg, loss="softmax", device="cpu", seed=seed, log=lambda line: None)
    if distributed.world()[0] == 0:
        torch.save({"state": model.state_dict(), "history": result.history, "world": distributed.world()[1]}, out)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
