"""Per-channel mean and standard deviation of the training images, as the model will see them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from inatpipe.atomic import write_json
from inatpipe.data.dataset import make_loader
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError


def channel_stats(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[list[float], list[float]]:
    """Mean and population std of each channel over every pixel, on the [0, 1] scale (uint8 images are scaled);
    float64 sums so large datasets lose no precision."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    loader = make_loader(dataset, batch_size, num_workers=num_workers)
    for x, _ in tqdm(loader, desc="stats", unit="batch", disable=None, leave=False):
        x = x.to(torch.float64) / (255 if x.dtype == torch.uint8 else 1)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        pixels += x.numel() // 3
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def compute_stats(prepared: Path, image_size: int, num_workers: int = 0) -> dict:
    """Statistics of the prepared train subset, resized to `image_size` as the eval transform resizes it."""
    read_meta(prepared, image_size)
    dataset = PreparedDataset(prepared, "train", BatchResize(image_size))
    mean, std = channel_stats(dataset, num_workers=num_workers)
    return {"image_size": image_size, "num_images": len(dataset), "mean": mean, "std": std}


def write_stats(stats: dict, path: Path) -> None:
    write_json(path, stats)


def read_stats(path: Path, image_size: int) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro stats` first")
    stats = json.loads(path.read_text())
    if stats["image_size"] != image_size:
        raise UserError(
            f"{path} was computed at image size {stats['image_size']}, not data.image_size={image_size}; "
            "run `dvc repro` so stats are recomputed"
        )
    # A constant channel (e.g. an all-grey dataset) would divide by zero when normalising.
    stats["std"] = [max(s, 1e-6) for s in stats["std"]]
    return stats
