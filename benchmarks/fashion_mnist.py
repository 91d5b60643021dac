"""FlexibleCNN on Fashion-MNIST through the real pipeline, against the dataset's published benchmark table.

Builds an iNaturalist-layout folder from the original idx files (train/<class>/ = the 60,000 training images,
val/<class>/ = the 10,000 test images), takes it in with `inatpipe data fetch <folder>` in a temporary git + DVC copy
of the project, and runs `dvc exp run evaluate@flexible -S ...` once per configuration below. Prints test accuracy,
best validation accuracy and training minutes of each, beside the dataset's published figures.

    apt-get install -y dataset-fashion-mnist      # the idx files, in /usr/share/datasets/fashion-mnist
    .venv/bin/python benchmarks/fashion_mnist.py  # both configurations (about 35 minutes on 2 CPU cores)
    .venv/bin/python benchmarks/fashion_mnist.py --only fast --source path/to/idx/folder
    .venv/bin/python benchmarks/fashion_mnist.py --only fast2 --ablate   # recipe 2, then each technique off in turn
    .venv/bin/python benchmarks/fashion_mnist.py --only fast2 --fit      # epochs: as many as fit its minutes here

Nothing in the library knows this dataset: each configuration is a plain params override, shown in full.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from inatpipe.testing import copy_pipeline, pipeline_env

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_FILES = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
PUBLISHED = {"plain 5-layer conv + BN CNN": 0.931, "ResNet18": 0.949}

# Shared by both configurations: the images are 28x28, garments are left/right symmetric, and four blocks pool
# 28 -> 14 -> 7 -> 3 -> 1. Precision `auto`: bf16 autocast with channels_last runs the convolutions about 2.5x as
# fast as fp32 on a CPU with AVX-512 BF16, but a CPU without it (AVX2 alone) only emulates bf16, about 12x slower than
# fp32, and `auto` then takes fp32. The epochs below suit a CPU with AVX-512 BF16; --fit sets them to what fits each
# configuration's minutes on the machine at hand (docs/benchmarks.md has runs of both kinds). Loading stays in the
# training process (num_workers 0): a batch of 128 prepared images is cropped and flipped in one vectorised call,
# well under a millisecond, so a loader process would only compete with torch's compute threads for the two cores.
COMMON = {
    "data.image_size": 28,
    "data.hflip": True,
    "data.rotation": 0.0,
    "data.crop_scale": 0.8,
    "data.num_workers": 0,
    "model.dropout": 0.3,
    "train.batch_size": 128,
    "train.optimizer": "adamw",
    "train.learning_rate": 3.0e-3,
    "train.weight_decay": 0.05,
    "train.scheduler": "onecycle",
    "train.label_smoothing": 0.1,
    "train.precision": "auto",
    "train.channels_last": True,
}
CONFIGS = {
    # name: params overrides; max_minutes caps each configuration's training time.
    "fast": {
        **COMMON,
        "model.num_filters": "[32,64,128,256]",
        "model.dense_neurons": 256,
        "train.epochs": 24,
        "train.warmup_epochs": 4.0,
        "train.max_minutes": 9.5,
    },
    "full": {
        # Two conv layers per block (VGG's stacking): eight conv layers instead of four, at 2.7x the compute.
        **COMMON,
        "model.num_filters": "[32,64,128,256]",
        "model.convs_per_block": 2,
        "model.dense_neurons": 256,
        "train.epochs": 32,
        "train.warmup_epochs": 5.0,
        "train.max_minutes": 29.0,
    },
}
# Recipe 2: the same networks with residual shortcuts, an EMA of the weights, random erasing and mirrored test
# images, calibrated. MixUp/CutMix are left out: they regularise over long schedules (hundreds of epochs in the
# recipes that use them), and these runs are 24 and 32 epochs long. TrivialAugment is left out too: its per-image
# operations cost more of two cores than an epoch of these networks can hide.
RECIPE2 = {
    "model.residual": True,
    "train.ema": 0.999,
    "data.random_erasing": 0.25,
    "evaluate.tta": "hflip",
    "evaluate.calibrate": True,
}
CONFIGS["fast2"] = {**CONFIGS["fast"], **RECIPE2}
CONFIGS["full2"] = {**CONFIGS["full"], **RECIPE2}
# --ablate: each technique of recipe 2 switched off in turn (the same seed), to show what each buys.
ABLATIONS = {
    "model.residual": False,
    "train.ema": 0.0,
    "data.random_erasing": 0.0,
    "evaluate.tta": "none",
    "train.cutmix": 0.0,
    "train.mixup": 0.0,
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not): uint8 images (n, 28, 28) or labels (n,)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def idx_file(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    sys.exit(f"error: {source}/{stem}[.gz] not found; apt-get install -y dataset-fashion-mnist, or pass --source")


def build_folder(source: Path, out: Path) -> None:
    """out/train/<class>/*.png from the 60,000 training images, out/val/<class>/*.png from the 10,000 test images."""
    for subset, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(idx_file(source, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(idx_file(source, f"{prefix}-labels-idx1-ubyte"))
        for name in CLASSES:
            (out / subset / name).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(tqdm(zip(images, labels, strict=True), total=len(labels), desc=subset)):
            Image.fromarray(img, "L").save(out / subset / CLASSES[label] / f"{i:05d}.png")


def set_args(overrides: dict) -> list[str]:
    """The overrides as `dvc exp run` arguments: -S key=value for each."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]


def fit_to_budget(overrides: dict, run, project: Path) -> dict:
    """The configuration with as many epochs as fit 95% of its `max_minutes` on this machine (at least 1), timed by
    training it for one epoch first (`run` runs a command in `project`), and its warm-up scaled with them."""
    one_epoch = {**overrides, "train.epochs": 1, "train.warmup_epochs": 0.5}
    run(sys.executable, "-m", "dvc", "exp", "run", "train_flexible", *set_args(one_epoch))
    epoch_s = json.loads((project / "metrics/train_flexible/metrics.json").read_text())["train_seconds"]
    epochs = max(1, int(0.95 * overrides["train.max_minutes"] * 60 / epoch_s))
    warmup = round(overrides["train.warmup_epochs"] * epochs / overrides["train.epochs"], 1)
    print(f"  one epoch took {epoch_s:.0f} s here: {epochs} epochs, warm-up {warmup}", flush=True)
    return {**overrides, "train.epochs": epochs, "train.warmup_epochs": warmup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_FILES, help="folder with the four idx files")
    parser.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only this configuration")
    parser.add_argument("--work", type=Path, help="keep the generated folder and project here (default: temporary)")
    parser.add_argument(
        "--ablate", action="store_true", help="also run each configuration with each recipe-2 technique off in turn"
    )
    parser.add_argument(
        "--fit",
        action="store_true",
        help="set each configuration's epochs to what fits its max_minutes on this machine (one epoch timed first)",
    )
    args = parser.parse_args()
    runs = {}
    for name in args.only or list(CONFIGS):
        runs[name] = CONFIGS[name]
        if args.ablate:
            for key, off in ABLATIONS.items():
                if key in CONFIGS[name] and CONFIGS[name][key] != off:
                    runs[f"{name}-no-{key.split('.')[1]}"] = {**CONFIGS[name], key: off}

    work = args.work or Path(tempfile.mkdtemp(prefix="fashion_mnist_"))
    folder, project = work / "fashion_mnist", work / "project"
    env = pipeline_env(project)

    def run(*cmd: str) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=project, env=env, text=True, capture_output=True)
        if result.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    try:
        if not (folder / "val").is_dir():
            build_folder(args.source, folder)
        shutil.rmtree(project, ignore_errors=True)
        copy_pipeline(ROOT, project, user="bench")
        run(sys.executable, "-m", "inatpipe.cli", "data", "fetch", str(folder))
        run("git", "add", "-A")
        run("git", "commit", "-qm", "Fashion-MNIST as an iNaturalist-layout folder")

        results, fitted = {}, {}
        for name, overrides in runs.items():
            if args.fit:
                # Timed once per network and training recipe: runs that differ in evaluation or augmentation alone
                # train the same epochs (and a run differing in evaluation alone reuses the training from DVC's run
                # cache).
                timed = tuple(sorted((k, str(v)) for k, v in overrides.items() if k.startswith(("model.", "train."))))
                if timed not in fitted:
                    print(f"{name}: fitting its epochs to {overrides['train.max_minutes']} minutes", flush=True)
                    fitted[timed] = fit_to_budget(overrides, run, project)
                overrides = {**overrides, **{k: fitted[timed][k] for k in ("train.epochs", "train.warmup_epochs")}}
            sets = set_args(overrides)
            print(f"{name}: dvc exp run evaluate@flexible {' '.join(sets)}", flush=True)
            start = time.perf_counter()
            exp = f"fmnist-{name}".replace("_", "-")
            run(sys.executable, "-m", "dvc", "exp", "run", "-n", exp, "evaluate@flexible", *sets)
            trained = json.loads((project / "metrics/train_flexible/metrics.json").read_text())
            tested = json.loads((project / "metrics/evaluate/flexible/metrics.json").read_text())
            results[name] = {
                "test": tested["test"]["accuracy"],
                "ece": tested["test"]["ece"],
                "ece_raw": tested["test"].get("ece_uncalibrated", tested["test"]["ece"]),
                "val": trained["best"]["val_accuracy"],
                "minutes": trained["train_seconds"] / 60,
                "epochs": trained["stop"]["epoch"],
                "wall": (time.perf_counter() - start) / 60,
            }
            r = results[name]
            print(
                f"  -> test {r['test']:.4f}  val {r['val']:.4f}  ECE {r['ece_raw']:.4f} -> {r['ece']:.4f}  "
                f"{r['epochs']} epochs, {r['minutes']:.1f} training minutes ({r['wall']:.1f} in all)",
                flush=True,
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ncores: {os.cpu_count()}   Fashion-MNIST, FlexibleCNN through `dvc exp run` (train 48,000 / val 12,000)")
    print(
        f"{'config':<24} {'test acc':>9} {'val acc':>8} {'ECE raw':>8} {'ECE':>7} {'epochs':>6} {'train min':>9} "
        f"{'exp min':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<24} {r['test']:9.4f} {r['val']:8.4f} {r['ece_raw']:8.4f} {r['ece']:7.4f} {r['epochs']:6d} "
            f"{r['minutes']:9.1f} {r['wall']:8.1f}"
        )
    for what, acc in PUBLISHED.items():
        print(f"published: {what:<28} {acc:.3f}")


if __name__ == "__main__":
    main()
