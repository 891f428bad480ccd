"""One model over two processes: a DistributedDataParallel fit under torchrun (gloo, CPU) is the
one-process fit of the same global batch, within float tolerance.

Why a tolerance and not bytes: DDP sums each rank's gradients and then averages them, a
different order of the same additions. Why they agree at all: each rank takes its share of the
very batches the one-process loader draws (``loops.distributed.ShardedBatchSampler``), the loss
is the same global mean, and early stopping reads rank 0's validation.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "ddp_fit.py"


def fit_in(tmp_path: Path, name: str, *launcher: str, seed: int = 3) -> dict:
    out = tmp_path / f"{name}.pt"
    result = subprocess.run([sys.executable, *launcher, str(SCRIPT), str(out), str(seed)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_process_ddp_fit_matches_the_one_process_fit(tmp_path):
    one = fit_in(tmp_path, "one")
    two = fit_in(tmp_path, "two", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    other_seed = fit_in(tmp_path, "other", seed=4)
    assert one["world"] == 1 and two["world"] == 2
    for key, value in one["state"].items():
        assert torch.allclose(value, two["state"][key], rtol=1e-4, atol=1e-5), key
    drift = max((value - two["state"][k]).abs().max().item() for k, value in one["state"].items())
    moved = max((value - other_seed["state"][k]).abs().max().item() for k, value in one["state"].items())
    assert moved > 1e3 * max(drift, 1e-9)  # another batch order is another model: the check can fail
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5


def test_shards_are_the_one_process_batches():
    """The sampler itself: the ranks' shares of each step make up the one-process loader's batch,
    epoch after epoch, also when a pass is cut short (precise BN reads a few batches)."""
    import itertools

    from torch.utils.data import DataLoader

    from cxr_noisy_student.loops.distributed import ShardedBatchSampler

    def passes(loader):
        first = [b.tolist() for b in loader]
        cut = [b.tolist() for b in itertools.islice(loader, 2)]
        return first + cut + [b.tolist() for b in loader]

    single = passes(DataLoader(list(range(22)), batch_size=6, shuffle=True, drop_last=True,
                               generator=torch.Generator().manual_seed(5)))
    shards = [passes(DataLoader(list(range(22)), batch_sampler=ShardedBatchSampler(
        22, 6, drop_last=True, seed=5, rank=r, world_size=2), generator=torch.Generator().manual_seed(5 + r)))
        for r in range(2)]
    assert [a + b for a, b in zip(*shards)] == single and len(single) == 3 + 2 + 3
    assert all(len(s) == 3 for s in shards[0]) and single[0] != single[5]
