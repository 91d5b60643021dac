"""Training on several processes under torchrun: process-group set-up, which rank writes, sharded samplers, and
sums reduced across ranks. Without torchrun (no WORLD_SIZE in the environment) every function is a no-op, so a
plain `python stages/train_flexible.py` runs as it always did.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from inatpipe.errors import UserError
from inatpipe.training.precision import memory_format


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
    atexit.register(leave)
    return device


def leave() -> None:
    """Leave the process group, if this process is (still) in one."""
    if active():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """`model` on `device` in its memory layout; under torchrun, wrapped in DistributedDataParallel, which averages
    gradients across ranks in backward. The wrapper shares the model's parameters: save the model, not the wrapper."""
    model.to(device, memory_format=memory_format(channels_last))
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


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's `t` (on the CPU), rank 0's first, on every rank; `t` itself in a single process.
    Shards may differ in length (an evaluation shard of N images over R ranks), so they travel as objects."""
    if not active():
        return t
    parts: list[torch.Tensor | None] = [None] * world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


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
    last, incomplete batch is dropped, so that every rank runs the same number of equal steps. The training loop
    sets the epoch before each one (`set_epoch`), so a run resumed at epoch k shuffles as the uninterrupted run did.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 1, *, place: tuple[int, int] = ()):
        """`place`: (this rank, number of ranks); by default, this process's under torchrun."""
        self.rank, ranks = place or (rank(), world_size())
        if batch_size % ranks:
            raise UserError(f"the batch size ({batch_size}) must be divisible by the number of processes ({ranks})")
        if num_samples < batch_size:
            raise UserError(f"the train subset has {num_samples} images, fewer than one batch of {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.epoch = epoch  # which epoch the next pass is: its shuffle
        self.share = batch_size // ranks

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * self.share
            yield order[start : start + self.share].tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Tell the loader's sharded sampler which epoch the next pass is, as torch's DistributedSampler.set_epoch; a
    loader without one (a single process) shuffles from its generator, which a resume state restores."""
    sampler = getattr(loader, "batch_sampler", None)
    if isinstance(sampler, ShardedBatches):
        sampler.set_epoch(epoch)


class Shard(Sampler[int]):
    """Evaluation under torchrun: rank r takes images r, r + N, r + 2N, ...; nothing is repeated, so sums reduced
    across ranks are exactly the single-process ones."""

    def __init__(self, num_samples: int, *, place: tuple[int, int] = ()):
        this, ranks = place or (rank(), world_size())
        self.indices = range(this, num_samples, ranks)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
