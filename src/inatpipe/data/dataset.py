"""The loader settings every stage shares, and normalisation of uint8 batches on the device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    sampler: Sampler[int] | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling and per-worker augmentation seeds all derive from `generator`.

    A `sampler` (of indices) or a `batch_sampler` (of whole batches) replaces shuffling, as the samplers that shard
    data across processes do. On a GPU, batches go to pinned memory so the copy to the device can overlap the
    previous step.
    """
    if batch_sampler is not None:
        order = {"batch_sampler": batch_sampler}
    else:
        order = {"batch_size": batch_size, "shuffle": shuffle and sampler is None, "sampler": sampler}
    return DataLoader(
        dataset,
        **order,
        num_workers=num_workers,
        # Iterating a loader draws its workers' base seed from this generator; without one of its own it would draw
        # from torch's global generator and shift the random numbers of a seeded run that builds it.
        generator=generator if generator is not None else torch.Generator(),
        pin_memory=device is not None and device.type == "cuda",
        # Not persistent: each epoch then starts fresh workers seeded from `generator`, so an epoch's augmentation
        # depends only on the generator's state, which a resume state saves. Persistent workers would carry RNG
        # states from epoch to epoch that no resume state can capture, and a resumed run would draw other crops.
        persistent_workers=False,
    )


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A uint8 batch (n, 3, h, w) scaled to [0, 1] and normalised per channel, as float32 on x's device; equal to
    ToDtype(float32, scale=True) then Normalize(mean, std) per image. `mean`, `std`: (1, 3, 1, 1) there."""
    return x.float().div_(255).sub_(mean).div_(std)


def channel_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class NormalizedLoader:
    """Batches of uint8 images from `loader`, copied to `device` and there scaled to [0, 1] and normalised.

    Copying uint8 moves a quarter of the bytes of float32, and one vectorised operation per batch (on the GPU when
    there is one) replaces a float conversion and a normalisation per image in the workers. Equal to
    ToDtype(float32, scale=True) then Normalize(mean, std) per image. Anything else (len, dataset, sampler,
    batch_size) is the wrapped loader's.
    """

    def __init__(self, loader: DataLoader, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.loader = loader
        self.device = device
        self.mean, self.std = channel_tensor(mean, device), channel_tensor(std, device)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield normalize(x.to(self.device, non_blocking=True), self.mean, self.std), y
