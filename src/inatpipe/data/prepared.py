"""Decode once: every image of a subset as one uint8 array, (n, side, side, 3), in a memory-mapped .npy file.

The `prepare` stage decodes each original once (a JPEG at reduced scale via Pillow's draft mode, then resized), so
no epoch of any experiment decodes a JPEG again; loaders read a slice of a memory-mapped file instead. The side is a
little above `data.image_size` (256 for 224, the usual ratio), leaving room for random crops. Like the report's
`Resize((224, 224))`, the whole picture is squashed to the square: nothing is cropped away, so evaluation sees the
same content as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from inatpipe.atomic import atomic_open, write_json
from inatpipe.data.dataset import make_loader
from inatpipe.data.images import prepare_image, prepared_side
from inatpipe.errors import UserError

SUBSETS = ("train", "val", "test")
META = "meta.json"


class IndexImages(Dataset):
    """The images an index (path, label) lists, each read as `prepare_image` reads it, with its class index (in the
    order of `classes`): what `prepare` stores."""

    def __init__(self, index: pd.DataFrame, classes: list[str], image_size: int):
        class_to_idx = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(index["label"]) - set(class_to_idx))
        if unknown:
            raise UserError(
                f"index lists class {unknown[0]!r}, which is not among the split's classes; rerun `dvc repro`"
            )
        self.paths = index["path"].tolist()
        self.targets = [class_to_idx[label] for label in index["label"]]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path = self.paths[i]
        try:
            return prepare_image(path, self.image_size), self.targets[i]
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


def prepare_subset(
    index: pd.DataFrame, classes: list[str], image_size: int, folder: Path, name: str, num_workers: int = 0
) -> int:
    """Write folder/<name>.npy (uint8, (n, side, side, 3)) and folder/<name>_labels.npy (int64 class indices)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = IndexImages(index, classes, image_size)
    side = prepared_side(image_size)
    target = folder / f"{name}.npy"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    # Written in place through a memory map (a subset may not fit in memory), then renamed: never half a file.
    images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(dataset), side, side, 3))
    labels = np.empty(len(dataset), dtype=np.int64)
    try:
        loader = make_loader(dataset, 64, num_workers=num_workers)
        start = 0
        for x, y in tqdm(loader, desc=f"prepare {name}", unit="batch", disable=None, leave=False):
            images[start : start + len(y)] = x.numpy()
            labels[start : start + len(y)] = y.numpy()
            start += len(y)
        images.flush()
        del images
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with atomic_open(folder / f"{name}_labels.npy", "wb") as f:
        np.save(f, labels)
    return len(dataset)


def prepare(
    indexes: dict[str, pd.DataFrame], classes: list[str], image_size: int, folder: Path, num_workers: int = 0
) -> dict:
    """Prepare every subset of `indexes` and write folder/meta.json; returns the metadata."""
    side = prepared_side(image_size)
    counts = {
        name: prepare_subset(index, classes, image_size, folder, name, num_workers) for name, index in indexes.items()
    }
    meta = {"image_size": image_size, "side": side, "classes": classes, "counts": counts}
    write_json(folder / META, meta)
    return meta


def read_meta(folder: Path, image_size: int | None = None) -> dict:
    path = folder / META
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro prepare` first")
    meta = json.loads(path.read_text())
    if image_size is not None and meta["image_size"] != image_size:
        raise UserError(
            f"{folder} was prepared for image size {meta['image_size']}, not data.image_size={image_size}; "
            "run `dvc repro` so it is prepared again"
        )
    return meta


class PreparedDataset(Dataset):
    """One prepared subset: items are (image, class index), the image a uint8 tensor (3, h, w) as `transform` leaves
    it (a batch transform of transforms.py; without one, the prepared square).

    Loaders fetch whole batches (`__getitems__`): one read of the rows from the memory-mapped array and one call of
    the batch transform, rather than a decode, a transform and a tensor per image. The array is mapped on first use
    in each process, so DataLoader workers share the page cache and a pickled dataset (sent to a worker) carries a
    path, not the pixels.
    """

    def __init__(self, folder: Path, subset: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.path = Path(folder) / f"{subset}.npy"
        labels = Path(folder) / f"{subset}_labels.npy"
        if not self.path.is_file() or not labels.is_file():
            raise UserError(f"{self.path} not found; run `dvc repro prepare` first")
        self.targets = np.load(labels).tolist()
        self.transform = transform
        self._images: np.ndarray | None = None

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
            if len(self._images) != len(self.targets):
                raise UserError(f"{self.path} does not match its labels; run `dvc repro prepare` again")
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # (n, side, side, 3) rows, copied out of the read-only map, viewed as (n, 3, side, side) without moving them
        x = torch.from_numpy(self.images[np.asarray(indices)]).permute(0, 3, 1, 2)
        if self.transform is not None:
            x = self.transform(x)
        return list(zip(x.unbind(0), (self.targets[i] for i in indices), strict=True))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]
