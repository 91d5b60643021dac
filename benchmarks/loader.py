"""Loader throughput at 224 px: the prepared arrays against the report's loader, on generated iNaturalist-like JPEGs.

The report's loader decodes and resizes every JPEG in every epoch (torchvision ImageFolder, Resize((224, 224)),
ToTensor, Normalize); the pipeline's loaders read images that the `prepare` stage decoded once. Both use the same
number of worker processes and batch size; one full pass each, after a short warm-up. The one-off `prepare` cost is
printed too.

    PYTHONPATH=src .venv/bin/python benchmarks/loader.py [--images 2000] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from synthetic import write_jpegs
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from inatpipe.cores import usable_cores
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import PreparedDataset, prepare
from inatpipe.data.transforms import BatchAugment, BatchResize

SIZE = 224
BATCH = 32
MEAN, STD = [0.4712, 0.4600, 0.3896], [0.2, 0.2, 0.2]  # the report's mean; any std costs the same


def images_per_second(loader, count: int) -> float:
    it = iter(loader)
    next(it)  # workers start and fill their queues: not part of the steady state
    start, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += len(x)
    return seen / (time.perf_counter() - start) if seen else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="loader processes for both loaders (the report: 2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images)
        report = DataLoader(
            datasets.ImageFolder(
                str(root),
                transforms.Compose(
                    [transforms.Resize((SIZE, SIZE)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
                ),
            ),
            batch_size=BATCH,
            shuffle=True,
            num_workers=args.workers,
        )
        report_rate = images_per_second(report, args.images)

        index = scan_folder(root)
        classes = sorted(index["label"].unique())
        start = time.perf_counter()
        meta = prepare({"train": index}, classes, SIZE, Path(tmp) / "prepared", args.workers)
        prepare_seconds = time.perf_counter() - start
        rates = {}
        for name, tf in (
            ("prepared, eval (resize)", BatchResize(SIZE)),
            ("prepared, train (crop, flip, rotate)", BatchAugment(SIZE, hflip=True, rotation=10.0, crop_scale=0.8)),
        ):
            dataset = PreparedDataset(Path(tmp) / "prepared", "train", tf)
            loader = make_loader(dataset, BATCH, shuffle=True, num_workers=args.workers)
            rates[name] = images_per_second(NormalizedLoader(loader, MEAN, STD, torch.device("cpu")), args.images)

    print(f"{args.images} JPEGs of 500-800 px a side, {SIZE} px, batch {BATCH}, {args.workers} workers, ")
    print(f"{usable_cores()} usable cores, torch {torch.__version__}")
    print(f"prepare (once): {prepare_seconds:.1f} s, {args.images / prepare_seconds:.0f} images/s, side {meta['side']}")
    print(f"{'loader':<40}{'images/s':>10}{'vs report':>11}")
    print(f"{'report (ImageFolder, Resize, ToTensor, Normalize)':<40}{report_rate:>10.0f}{1.0:>10.1f}x")
    for name, rate in rates.items():
        print(f"{name:<40}{rate:>10.0f}{rate / report_rate:>10.1f}x")


if __name__ == "__main__":
    main()
