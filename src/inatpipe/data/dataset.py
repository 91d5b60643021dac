"""A dataset over an index file's rows, and the loader settings every stage shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from inatpipe.data.images import open_rgb
from inatpipe.errors import UserError


class IndexDataset(Dataset):
    """Images listed in an index (path, label); labels become class indices in the order of `classes`.

    Every image is read as 8-bit RGB by `open_rgb`, whatever its mode, and upright as its EXIF tag says.
    """

    def __init__(
        self,
        index: pd.DataFrame,
        classes: list[str],
        transform: Callable | None = None,
        draft_size: tuple[int, int] | None = None,
    ):
        class_to_idx = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(index["label"]) - set(class_to_idx))
        if unknown:
            raise UserError(
                f"index lists class {unknown[0]!r}, which is not among the split's classes; rerun `dvc repro`"
            )
        self.paths = index["path"].tolist()
        self.targets = [class_to_idx[label] for label in index["label"]]
        self.transform = transform
        self.draft_size = draft_size  # decode JPEGs at reduced scale, no smaller than this (see open_rgb)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            img = open_rgb(path, self.draft_size)
        except FileNotFoundError:
            raise UserError(
                f"{path} is listed in the index but missing; rerun `dvc repro` after changing data/"
            ) from None
        except OSError as e:  # PIL's UnidentifiedImageError is one too
            # Split left out every unreadable file, so this one changed since; stop rather than silently train on a
            # different set than the index (and DVC) record. `dvc repro` reruns split, which then leaves it out.
            raise UserError(
                f"{path} is not a readable image ({e}); it changed after `split` ran: rerun `dvc repro`"
            ) from None
        return (self.transform(img) if self.transform else img), self.targets[i]


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
        generator=generator,
        pin_memory=device is not None and device.type == "cuda",
        # Not persistent: each epoch then starts fresh workers seeded from `generator`, so an epoch's augmentation
        # depends only on the generator's state, which a resume state saves. Persistent workers would carry RNG
        # states from epoch to epoch that no resume state can capture, and a resumed run would draw other crops.
        persistent_workers=False,
    )


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
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
            yield x, y
