"""Speed of the dirty-data scan that `split` runs: images checked per second on photo-sized JPEGs.

Writes N JPEGs of 500-800 px a side (iNaturalist 12K averages about 300 kB a photo; these are about 220 kB) into a
temporary folder. Times, in one process on 300 of them, the scan's check (JPEG draft mode) against a full decode
(what every training epoch does for every image), then the whole scan as `split` runs it, on every available core.
Each figure is the best of a few runs, the least disturbed by other load.

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

from inatpipe.cores import usable_cores
from inatpipe.data.images import open_rgb
from inatpipe.data.scan import check_image, scan_folders

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


def best_rate(n: int, work, repeats: int = 3) -> float:
    """Images per second of the fastest of `repeats` runs: the least disturbed by other load on the machine."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - start)
    return n / min(seconds)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "train"
        write_photos(root, n)
        files = sorted(str(f) for f in root.rglob("*.jpg"))
        mb = sum(Path(f).stat().st_size for f in files) / 1e6
        cores = usable_cores()
        print(f"{n} JPEGs, 500-800 px, {mb / n * 1000:.0f} kB each on average; {cores} cores available")
        assert all(check_image(f) is None for f in files)  # also brings every file into the page cache
        subset = files[: min(n, 300)]
        for name, check in (("draft mode", check_image), ("full decode", open_rgb)):
            rate = best_rate(len(subset), lambda check=check: [check(f) for f in subset])
            print(f"1 process, {name}: {rate:,.0f} images/s")
        rate = best_rate(n, lambda: scan_folders([root], workers=cores), repeats=2)
        print(f"scan_folders (as split runs it), {cores} processes: {rate:,.0f} images/s")


if __name__ == "__main__":
    main()
