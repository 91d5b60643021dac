"""FlexibleCNN training images/s at 224 px through the real training loop, for each precision and memory layout.

The report's architecture (five conv blocks of 64 filters, kernel 5, batch norm, dense 512) trains on prepared
images of generated iNaturalist-like JPEGs with the pipeline's own loaders (augmentation in workers, normalisation
on the batch) and `inatpipe.training.train_one_epoch`. Each setting gets a fresh model, one warm-up epoch and one
timed epoch; the share of the timed epoch spent waiting for the next batch is the data wait.

    PYTHONPATH=src .venv/bin/python benchmarks/training_throughput.py [--images 192] [--batch-size 32] [--settings ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from synthetic import write_jpegs
from torch import nn

from inatpipe.cores import loader_workers, usable_cores
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import PreparedDataset, prepare
from inatpipe.data.transforms import BatchAugment
from inatpipe.models import build_model
from inatpipe.runtime import choose_device, seed_everything
from inatpipe.training.loop import train_one_epoch

SIZE = 224
REPORT_CNN = {
    "image_size": SIZE,
    "num_filters": [64] * 5,
    "kernel_size": 5,
    "batch_norm": True,
    "dense_neurons": 512,
}
SETTINGS = {  # name: (precision, channels_last, torch.compile)
    "fp32": ("fp32", False, False),
    "channels_last": ("fp32", True, False),
    "bf16": ("bf16", False, False),
    "bf16 + channels_last": ("bf16", True, False),
    "bf16 + channels_last + compile": ("bf16", True, True),
}


class Timed:
    """Iterates `loader`, adding up the seconds spent waiting for each batch."""

    def __init__(self, loader):
        self.loader, self.wait = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch


def run(setting: str, loader, num_classes: int, device: torch.device) -> tuple[float, float]:
    """(images/s, share of time waiting for data) of the timed epoch."""
    precision, channels_last, compile = SETTINGS[setting]
    seed_everything(0)
    model = build_model("flexible_cnn", num_classes, REPORT_CNN)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = (optimizer, nn.CrossEntropyLoss(), device)
    net = torch.compile(model) if compile else model  # as fit runs it with `compile: true`
    train_one_epoch(net, loader, *args, precision=precision, channels_last=channels_last)  # warm-up (and compile)
    timed = Timed(loader)
    start = time.perf_counter()
    loss, _, _ = train_one_epoch(net, timed, *args, precision=precision, channels_last=channels_last)
    seconds = time.perf_counter() - start
    assert torch.isfinite(torch.tensor(loss)), f"{setting}: loss {loss}"
    return len(loader.dataset) / seconds, timed.wait / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192, help="images per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="auto", help="loader processes (auto: as data.num_workers: auto)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="fp32 always runs")
    args = parser.parse_args()
    device = choose_device(args.device)
    workers = loader_workers(args.workers if args.workers == "auto" else int(args.workers))
    with tempfile.TemporaryDirectory() as tmp:
        index = scan_folder(write_jpegs(Path(tmp) / "jpegs", args.images))
        classes = sorted(index["label"].unique())
        prepare({"train": index}, classes, SIZE, Path(tmp) / "prepared", workers)
        augment = BatchAugment(SIZE, hflip=True, rotation=10.0, crop_scale=0.8)
        dataset = PreparedDataset(Path(tmp) / "prepared", "train", augment)
        loader = make_loader(
            dataset,
            args.batch_size,
            shuffle=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),
            device=device,
        )
        loader = NormalizedLoader(loader, [0.47, 0.46, 0.39], [0.24, 0.23, 0.25], device)
        chosen = ["fp32", *(name for name in args.settings if name != "fp32")]  # the baseline of every ratio
        results = {setting: run(setting, loader, len(classes), device) for setting in chosen}

    print(
        f"FlexibleCNN 5x64 filters, kernel 5, batch norm, dense 512, {SIZE} px, batch {args.batch_size}, "
        f"{args.images} images per epoch, {workers} loader workers, {device}, {usable_cores()} usable cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'setting':<32}{'images/s':>10}{'vs fp32':>9}{'data wait':>11}")
    base = results["fp32"][0]
    for setting, (rate, wait) in results.items():
        print(f"{setting:<32}{rate:>10.1f}{rate / base:>8.2f}x{wait:>10.1%}")


if __name__ == "__main__":
    main()
