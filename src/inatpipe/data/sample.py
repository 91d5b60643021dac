"""The embedded default dataset: scikit-learn's bundled handwritten digits written as real RGB image files.

Same layout as the iNaturalist 12K zip (train/<class>/, val/<class>/). Every build is byte-identical on any
machine: integer arithmetic only, nearest-neighbour upscaling, and uncompressed BMP files (a compressor's
output can change between library versions; raw pixels cannot). That keeps the committed data.dvc valid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from inatpipe.errors import UserError

UPSCALE = 4  # 8x8 digits become 32x32 images
TEST_EVERY = 5  # every 5th image of each class goes to the held-out val/ (test) folder: 20%
SEED = 2024  # colours only; changing it changes every file and so the committed data.dvc


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 of shape (n, 32, 32, 3), labels): each digit gets its own dark background and bright ink."""
    digits = load_digits()
    ink_level = digits.images.astype(np.int64)  # 0..16
    rng = np.random.default_rng(SEED)
    background = rng.integers(0, 64, size=(len(ink_level), 1, 1, 3))
    ink = rng.integers(160, 256, size=(len(ink_level), 1, 1, 3))
    level = ink_level[..., None]
    rgb = (background * (16 - level) + ink * level) // 16
    big = rgb.repeat(UPSCALE, axis=1).repeat(UPSCALE, axis=2)
    return big.astype(np.uint8), digits.target


def build_digits_sample(out: Path) -> int:
    """Write the sample to `out` (which must not exist) atomically; returns the number of images written."""
    if out.exists():
        raise UserError(
            f"{out}/ already exists; the sample is only built where there is no data (move {out}/ away first)"
        )
    images, labels = digit_images()
    staging = out.with_name(f".{out.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    seen_per_class: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        nth = seen_per_class.get(int(label), 0)
        seen_per_class[int(label)] = nth + 1
        subset = "val" if nth % TEST_EVERY == TEST_EVERY - 1 else "train"
        folder = staging / subset / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "RGB").save(folder / f"{i:04d}.bmp", format="BMP")
    staging.rename(out)
    return len(images)
