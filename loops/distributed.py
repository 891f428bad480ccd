"""One model over several processes: PyTorch DistributedDataParallel under ``torchrun``.

``torchrun --nproc_per_node N run_cycle.py run --only gen0/classifier/fold3`` starts N processes
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`init_from_env` joins them into one process
group (NCCL on CUDA, gloo on the CPU) and ``loops.train.fit`` then trains one model with all of
them: each rank takes an equal share of every global batch, DDP averages the gradients, and rank 0
alone writes what the fit produces (the same checkpoint as a one-process fit).

Why the shares come from the one-process order (:class:`ShardedBatchSampler`) rather than
``DistributedSampler``'s own: the global batches of an N-process fit are then exactly those of a
one-process fit with the same seed and global batch, so the two differ only by float reductions
(and BatchNorm statistics, per rank on the CPU; synchronised with SyncBatchNorm on CUDA) and a fit
can be checked against the other.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler, Sampler


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun described in the environment; False when not under torchrun.

    On CUDA each rank takes the GPU of its local rank (``cuda`` then means that one).
    """
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's share of the global batches a one-process ``DataLoader(shuffle=True)`` would make.

    The global order is drawn exactly as the one-process loader draws it from a generator seeded
    alike: per pass, one int64 (the loader's worker base seed) and then a ``RandomSampler``
    permutation batched by ``BatchSampler``. Rank ``r`` of ``w`` takes the ``r``-th contiguous part
    of each global batch.
    """

    def __init__(self, n: int, batch_size: int, *, drop_last: bool, seed: int, rank: int, world_size: int):
        if min(batch_size, n) < world_size:
            raise ValueError(f"a global batch of {min(batch_size, n)} images cannot be shared by {world_size} processes")
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = BatchSampler(RandomSampler(range(n), generator=self.generator), batch_size, drop_last)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader's base-seed draw
        for batch in self.batches:
            yield np.array_split(np.asarray(batch), self.world_size)[self.rank].tolist()

    def __len__(self) -> int:
        return len(self.batches)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module every rank runs forward through (DDP averages gradients in backward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, BatchNorm statistics over the global batch (timm's converter keeps its fused
    BatchNormAct layers); NCCL only, so on the CPU each rank normalises by its own share."""
    if device.type != "cuda":
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def average_buffers(model: nn.Module) -> None:
    """Average floating point buffers (BatchNorm running statistics) over the ranks, so that every
    rank evaluates -- and rank 0 saves -- the same statistics."""
    rank, size = world()
    if size == 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(size)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (epoch losses and counts for the history)."""
    if world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def from_rank0(value):
    """Rank 0's value on every rank (the validation metric: early stopping must agree)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
