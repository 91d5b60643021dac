"""A dataset over an index file's rows, and the loader settings every stage shares."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from inatpipe.data.images import open_rgb
from inatpipe.errors import UserError


class IndexDataset(Dataset):
    """Images listed in an index (path, label); labels become class indices in the order of `classes`.

    Every image is read as 8-bit RGB by `open_rgb`, whatever its mode, and upright as its EXIF tag says.
    """

    def __init__(self, index: pd.DataFrame, classes: list[str], transform: Callable | None = None):
        class_to_idx = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(index["label"]) - set(class_to_idx))
        if unknown:
            raise UserError(
                f"index lists class {unknown[0]!r}, which is not among the split's classes; rerun `dvc repro`"
            )
        self.paths = index["path"].tolist()
        self.targets = [class_to_idx[label] for label in index["label"]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.paths[i]
        try:
            img = open_rgb(path)
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
) -> DataLoader:
    """A DataLoader whose shuffling and per-worker augmentation seeds all derive from `generator`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
