"""Train and eval transform presets, side by side so their differences are easy to see.

`resize` and `augment` work on PIL images (whose resize and rotation are fast C code) and end in uint8 tensors:
loaders over prepared images use them and leave scaling and normalisation to the batch (`NormalizedLoader`). The
full presets add both per image, for single files.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def resize(image_size: int) -> v2.Compose:
    """Resize to a square: the common head of every preset; an RGB image in, a uint8 tensor out."""
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), v2.ToImage()])


def augment(image_size: int, *, hflip: bool, rotation: float, crop_scale: float) -> v2.Compose:
    """Random resized crop, optional horizontal flip and rotation; an RGB image in, a uint8 tensor out."""
    steps: list = [v2.RandomResizedCrop((image_size, image_size), scale=(crop_scale, 1.0), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    return v2.Compose([*steps, v2.ToImage()])


def to_tensor(image_size: int) -> v2.Compose:
    """Resize to a square and scale to [0, 1]: what `stats` measures."""
    return v2.Compose([resize(image_size), v2.ToDtype(torch.float32, scale=True)])


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
    """`augment`, then the eval normalisation."""
    return v2.Compose(
        [
            augment(image_size, hflip=hflip, rotation=rotation, crop_scale=crop_scale),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
