"""Speed of the dirty-data scan that `split` runs: images checked per second on photo-sized JPEGs.

Writes N JPEGs of 500-800 px a side (iNaturalist photos are about that size) into a temporary folder, then scans
them with every available core and with one, and prints images/s for each. A full decode without JPEG draft mode
is timed on a subset for comparison.

    .venv/bin/python benchmarks/scan.py            # 2,000 images
    .venv/bin/python benchmarks/scan.py 12000      # the size of iNaturalist 12K
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inatpipe.data.images import open_rgb
from inatpipe.data.scan import available_cores, scan_folders

CLASSES = 10


def write_photos(root: Path, n: int, seed: int = 0) -> None:
    """Smooth colour gradients plus noise: JPEG sizes close to real photos' (about 100-200 kB at these sizes)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.integers(500, 801, size=2)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
        img = (base + rng.integers(-40, 40, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
        folder = root / f"class_{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        write_photos(root, n)
        mb = sum(f.stat().st_size for f in root.rglob("*.jpg")) / 1e6
        print(f"{n} JPEGs, 500-800 px, {mb:.0f} MB; {available_cores()} cores available")
        for workers in sorted({available_cores(), 1}, reverse=True):
            start = time.perf_counter()
            (scan,) = scan_folders([root], workers=workers)
            seconds = time.perf_counter() - start
            assert len(scan.images) == n and not scan.excluded
            print(f"scan, {workers} worker(s), draft mode: {n / seconds:,.0f} images/s ({seconds:.1f} s)")
        subset = sorted(root.rglob("*.jpg"))[: min(n, 300)]
        start = time.perf_counter()
        for path in subset:
            open_rgb(path)
        seconds = time.perf_counter() - start
        print(f"full decode, 1 worker, no draft mode: {len(subset) / seconds:,.0f} images/s")


if __name__ == "__main__":
    main()
