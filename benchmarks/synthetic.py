"""Photo-like JPEGs of iNaturalist-like sizes (500-800 px a side) in class folders, for the loader and training
benchmarks: smooth colour fields with grain, which compress and decode like photographs rather than like noise."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from inatpipe.cores import usable_cores


def _write(args: tuple[Path, int]) -> None:
    path, seed = args
    rng = np.random.default_rng(seed)
    width, height = rng.integers(500, 801, size=2)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((int(width), int(height)), Image.Resampling.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, size=img.shape, dtype=np.int16)  # grain
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(root: Path, count: int, num_classes: int = 10, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg, `count` images spread evenly over `num_classes` classes."""
    jobs = []
    for i in range(count):
        folder = root / f"class_{i % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.jpg", seed * 1_000_003 + i))
    with ProcessPoolExecutor(max(1, usable_cores())) as pool:
        list(pool.map(_write, jobs, chunksize=32))
    return root
