"""Cached backbone features against the report's loop: 20 head epochs on the same images, in one run.

The report's loop runs the full forward pass through the frozen backbone over every image in every epoch; the
cached path runs the backbone once over train and val, then trains the head on the stored features. Both use the
library's own code (training/transfer.py, training/features.py, the same `fit` loop, optimizer and schedule) from
the same initial weights. Prints both times (the cached one includes its feature pass), the ratio, and both final
val accuracies.

    .venv/bin/python benchmarks/cached_features.py                    # resnet50, 300 images of 64x64, 20 epochs
    .venv/bin/python benchmarks/cached_features.py --arch resnet18 --images 100 --epochs 2   # a quick look

The images are generated (real PNG files in a temporary folder): each class a colour and stripe orientation, with
noise. The backbone starts from torchvision's random initialisation (`resnet.weights: none`): ImageNet weights
need a download, and the timing does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import PreparedDataset, prepare
from inatpipe.data.stats import compute_stats
from inatpipe.data.transforms import BatchResize
from inatpipe.models.resnet import TransferResNet
from inatpipe.params import parse_params
from inatpipe.runtime import seed_everything
from inatpipe.training.features import extract
from inatpipe.training.transfer import feature_loaders, finetune_history, finetuning_steps, head_history

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 5


def write_images(root: Path, per_class: int, size: int, seed: int = 0) -> None:
    """root/<class>/<i>.png: a dominant colour per class and stripes of a class-specific orientation, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for k in range(CLASSES):
        (root / f"class{k}").mkdir(parents=True)
        angle = np.pi * k / CLASSES
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3 + phase) > 0
            img = rng.integers(0, 90, size=(size, size, 3))
            img[..., k % 3] += 100
            img[stripes] += 60
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"class{k}" / f"{i:03d}.png")


def loaders(folder: Path, size: int, batch_size: int, seed: int):
    """Train and val loaders over a stratified 80/20 split of the prepared images (as the pipeline reads them),
    normalised with the train statistics, no augmentation; both share one generator, as in train_resnet."""
    index = scan_folder(folder)
    val_mask = index.groupby("label").cumcount() % 5 == 0
    classes = sorted(set(index["label"]))
    prepared = folder.parent / f"prepared-{size}"
    if not (prepared / "meta.json").is_file():
        prepare({"train": index[~val_mask], "val": index[val_mask]}, classes, size, prepared)
    stats = compute_stats(prepared, size)
    generator = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")

    def loader(subset: str, shuffle: bool) -> NormalizedLoader:
        dataset = PreparedDataset(prepared, subset, BatchResize(size))
        return NormalizedLoader(
            make_loader(dataset, batch_size, shuffle=shuffle, generator=generator), stats["mean"], stats["std"], cpu
        )

    return loader("train", True), loader("val", False), generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=300, help="in all, over 5 classes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["resnet"].update({"arch": args.arch, "weights": "none", "strategy": "head", "epochs": args.epochs})
    recipe = parse_params(raw).resnet  # the shipped head recipe (optimizer, schedule, smoothing, batch size)
    cpu = torch.device("cpu")
    print(
        f"{args.arch}, {args.images} images of {args.size}x{args.size}, {args.epochs} epochs, "
        f"batch {recipe.batch_size}, {torch.get_num_threads()} torch threads"
    )

    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "images", args.images // CLASSES, args.size)
        loaders(Path(tmp) / "images", args.size, recipe.batch_size, seed=1)  # prepared once, before timing
        seed_everything(0)
        report = TransferResNet(CLASSES, args.arch)
        cached = copy.deepcopy(report)

        train, val, _ = loaders(Path(tmp) / "images", args.size, recipe.batch_size, seed=1)
        start = time.perf_counter()
        steps = finetuning_steps(report, recipe, len(train), cpu)
        slow = list(finetune_history(report, recipe, steps, train, val, cpu))
        slow_seconds = time.perf_counter() - start

        train, val, generator = loaders(Path(tmp) / "images", args.size, recipe.batch_size, seed=1)
        start = time.perf_counter()
        unshuffled = {
            subset: NormalizedLoader(
                make_loader(loader.dataset, 64), loader.mean.flatten().tolist(), loader.std.flatten().tolist(), cpu
            )
            for subset, loader in (("train", train), ("val", val))
        }
        # the backbone pass in the recipe's precision and layout, as the report's loop runs it
        features = extract(
            cached.backbone, unshuffled, cpu, meta={}, precision=recipe.precision, channels_last=recipe.channels_last
        )
        feature_seconds = time.perf_counter() - start
        fast_train, fast_val = feature_loaders(features, recipe.batch_size, generator, cpu)
        fast = list(
            head_history(
                cached, recipe, finetuning_steps(cached, recipe, len(fast_train), cpu), fast_train, fast_val, cpu
            )
        )
        fast_seconds = time.perf_counter() - start

    print(
        f"report's loop (backbone every epoch): {slow_seconds:8.1f} s   final val accuracy {slow[-1].val_accuracy:.4f}"
    )
    print(
        f"cached features (one backbone pass):  {fast_seconds:8.1f} s   final val accuracy {fast[-1].val_accuracy:.4f}"
        f"   (feature pass {feature_seconds:.1f} s)"
    )
    print(f"speed-up: {slow_seconds / fast_seconds:.1f}x")


if __name__ == "__main__":
    main()
