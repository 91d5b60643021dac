"""Train and eval transform presets, side by side so their differences are easy to see."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def to_tensor(image_size: int) -> v2.Compose:
    """Resize to a square and scale to [0, 1]: the common head of every preset, and what `stats` measures."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([to_tensor(image_size), v2.Normalize(mean, std)])


def train_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    hflip: bool,
    rotation: float,
    crop_scale: float,
) -> v2.Compose:
    """Random resized crop, optional horizontal flip and rotation, then the eval normalisation."""
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop((image_size, image_size), scale=(crop_scale, 1.0), antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
