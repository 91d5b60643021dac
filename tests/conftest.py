"""Shared fixtures: tiny image folders written to disk as real files, and the project's paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "owl"),
    per_class: int = 10,
    size: int = 16,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """root/<class>/<i><ext>: each class a different dominant colour plus noise, so it is learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, size=(size, size, 3))
            img[..., k % 3] += 150
            if k >= 3:  # more classes than channels: a bright stripe tells them apart
                img[(k - 3) % size, :, :] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}{ext}")
    return root


def write_dataset(root: Path, train_per_class: int = 10, test_per_class: int = 4, seed: int = 0, **kwargs) -> Path:
    """A dataset in the iNaturalist layout: root/train/<class>/, root/val/<class>/ (val is the test set)."""
    write_image_folder(root / "train", per_class=train_per_class, seed=seed, **kwargs)
    write_image_folder(root / "val", per_class=test_per_class, seed=seed + 1, **kwargs)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")
