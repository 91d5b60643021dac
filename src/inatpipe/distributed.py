"""Training on several processes under torchrun: process-group set-up, which rank writes, sharded samplers, and
sums reduced across ranks. Without torchrun (no WORLD_SIZE in the environment) every function is a no-op, so a
plain `python stages/train_flexible.py` runs as it always did.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from inatpipe.errors import UserError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The one process that writes checkpoints, dvclive files and metrics, and prints progress."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun started (NCCL between GPUs, gloo on CPUs); returns this rank's device."""
    if "WORLD_SIZE" not in os.environ or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return device


def wrap(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """`model` on `device` in its memory layout; under torchrun, wrapped in DistributedDataParallel, which averages
    gradients across ranks in backward. The wrapper shares the model's parameters: save the model, not the wrapper."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if not active():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sums(*values: float, device: torch.device) -> list[float]:
    """Each value summed over the ranks (in float64, so counts stay exact); unchanged in a single process."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def agree(flag: bool) -> bool:
    """Rank 0's decision, on every rank (a stop on a wall-time budget could otherwise differ between ranks)."""
    if not active():
        return flag
    decision = [flag]
    dist.broadcast_object_list(decision, src=0)
    return bool(decision[0])


class ShardedBatches(Sampler[list[int]]):
    """Training batches under torchrun: every epoch, one shuffle of the whole subset (the same on every rank, from
    `seed` and the epoch), cut into global batches of `batch_size`, of which each rank takes its equal share.

    So N ranks together see the batches one process would, and with gradients averaged take the same steps. The
    last, incomplete batch is dropped, so that every rank runs the same number of equal steps.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 0):
        ranks = world_size()
        if batch_size % ranks:
            raise UserError(f"the batch size ({batch_size}) must be divisible by the number of processes ({ranks})")
        if num_samples < batch_size:
            raise UserError(f"the train subset has {num_samples} images, fewer than one batch of {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch = epoch  # counts the passes over the data; set it to resume from a later epoch
        self.share, self.rank = batch_size // ranks, rank()

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * self.share
            yield order[start : start + self.share].tolist()


class Shard(Sampler[int]):
    """Evaluation under torchrun: rank r takes images r, r + N, r + 2N, ...; nothing is repeated, so sums reduced
    across ranks are exactly the single-process ones."""

    def __init__(self, num_samples: int):
        self.indices = range(rank(), num_samples, world_size())

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
