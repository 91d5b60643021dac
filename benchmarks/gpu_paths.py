"""The GPU paths, checked and timed on a CUDA machine in one run: mixed precision (bf16; fp16 with loss scaling),
channels_last, torch.compile, evaluation's timed forward pass, a resumed run's optimizer state and weight average
on the GPU, the recipe's mixing, policy, erasing and EMA on GPU batches, and DistributedDataParallel with NCCL
under torchrun.

    PYTHONPATH=src python benchmarks/gpu_paths.py                 # everything (about 2 minutes on one H100)
    PYTHONPATH=src python benchmarks/gpu_paths.py --images 2048 --size 224 --steps 50

Training runs the library's own loop (`train_one_epoch`, `fit`): per precision setting on batches already on the GPU
(the model's compute), and whole epochs through the pipeline's batched loader on prepared images (uint8 to the GPU
from pinned memory, normalised there). The images are generated: each class a colour and a stripe orientation,
with noise. Prints images/s per setting with its ratio to fp32, and one line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.images import prepared_side
from inatpipe.data.prepared import PreparedDataset
from inatpipe.data.transforms import BatchAugment, BatchErase, BatchPolicy, BatchResize, Chain
from inatpipe.evaluation.metrics import predict
from inatpipe.models import build_model
from inatpipe.runtime import seed_everything
from inatpipe.training import distributed
from inatpipe.training.ema import WeightAverage
from inatpipe.training.loop import evaluate, fit, train_one_epoch
from inatpipe.training.mixing import batch_mixer
from inatpipe.training.precision import grad_scaler, resolve_precision
from inatpipe.training.recipe import Progress
from inatpipe.training.resume import ResumeRun

CLASSES = 10
# The report's FlexibleCNN: five conv blocks of 64 filters, kernel 5, batch norm, dense 512.
CONFIG = {"num_filters": [64] * 5, "kernel_size": 5, "dense_neurons": 512, "dropout": 0.3}
SETTINGS = {
    "fp32": ("fp32", False, False),
    "bf16": ("bf16", False, False),
    "bf16 + channels_last": ("bf16", True, False),
    "fp16 + channels_last": ("fp16", True, False),
    "bf16 + channels_last + compile": ("bf16", True, True),
}


def write_prepared(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """folder/{train,val}.npy and labels as the prepare stage writes them, generated rather than decoded."""
    side = prepared_side(size)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    folder.mkdir(parents=True)
    for subset, count in (("train", n), ("val", n // 4)):
        labels = rng.integers(0, CLASSES, count)
        images = rng.integers(0, 80, size=(count, side, side, 3), dtype=np.int64)
        for i, k in enumerate(labels):
            angle = np.pi * k / CLASSES
            images[i][np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 4) > 0] += 90
            images[i, ..., k % 3] += 60
        np.save(folder / f"{subset}.npy", images.clip(0, 255).astype(np.uint8))
        np.save(folder / f"{subset}_labels.npy", labels.astype(np.int64))
    meta = {"image_size": size, "side": side, "classes": [f"c{k}" for k in range(CLASSES)], "counts": {}}
    (folder / "meta.json").write_text(json.dumps(meta))


def loaders(
    folder: Path, size: int, batch: int, device: torch.device, generator: torch.Generator, strong: bool = False
):
    """Train and val loaders as the stages build them; `strong` adds TrivialAugmentWide and random erasing."""
    mean, std = [0.3] * 3, [0.25] * 3
    augment = BatchAugment(size, hflip=True, rotation=10.0, crop_scale=0.8)
    if strong:
        augment = Chain(augment, BatchPolicy("trivialaugment"), BatchErase(0.25))
    train = make_loader(
        PreparedDataset(folder, "train", augment),
        batch,
        shuffle=True,
        num_workers=4,
        generator=generator,
        device=device,
    )
    val = make_loader(PreparedDataset(folder, "val", BatchResize(size)), batch, num_workers=4, device=device)
    return NormalizedLoader(train, mean, std, device), NormalizedLoader(val, mean, std, device)


def step_rate(size: int, batch: int, device: torch.device, setting: tuple[str, bool, bool], steps: int) -> float:
    """Training steps per second of the library's loop on batches already on the GPU: the model's compute alone."""
    precision, channels_last, compiled = setting
    seed_everything(0, deterministic=False)
    x = torch.randn(steps, batch, 3, size, size, device=device)
    y = torch.randint(0, CLASSES, (steps, batch), device=device)
    model = build_model("flexible_cnn", CLASSES, {"image_size": size, **CONFIG})
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    runner = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = grad_scaler(device, precision)
    args = (optimizer, torch.nn.CrossEntropyLoss(), device, "steps", None, 0.0, precision, channels_last, scaler)
    batches = list(zip(x.unbind(), y.unbind(), strict=True))
    train_one_epoch(runner, batches, *args)  # warm-up (and compilation)
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _, _ = train_one_epoch(runner, batches, *args)
    torch.cuda.synchronize()
    assert np.isfinite(loss), (setting, loss)
    assert all(p.dtype == torch.float32 for p in model.parameters()), setting  # autocast leaves weights fp32
    if precision == "fp16":
        assert scaler is not None and scaler.get_scale() > 0, "fp16 trains with a live loss scaler"
    return steps * batch / (time.perf_counter() - start)


def loader_rate(folder: Path, size: int, batch: int, device: torch.device, recipe2: bool = False) -> float:
    """Images per second of one epoch through the pipeline's loader (augmented on the CPU, uint8 to the GPU from
    pinned memory, normalised there) and the training step, in the default precision (bf16 + channels_last).
    `recipe2`: with TrivialAugmentWide and random erasing in the loader, MixUp/CutMix and an EMA in the loop."""
    generator = seed_everything(0, deterministic=False)
    train, _ = loaders(folder, size, batch, device, generator, strong=recipe2)
    model = build_model("flexible_cnn", CLASSES, {"image_size": size, **CONFIG}).to(
        device, memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mix, ema = None, None
    if recipe2:
        mix = batch_mixer(_Recipe2(), CLASSES)
        ema = WeightAverage(model, 0.999).to(device, torch.channels_last)
    args = (optimizer, torch.nn.CrossEntropyLoss(), device, "epoch", None, 0.0, "bf16", True, None, mix, ema)
    train_one_epoch(model, train, *args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _, _ = train_one_epoch(model, train, *args)
    torch.cuda.synchronize()
    assert np.isfinite(loss), loss
    if ema is not None:
        assert {p.device.type for p in ema.model.parameters()} == {"cuda"}
    return len(train.dataset) / (time.perf_counter() - start)


class _Recipe2:
    """The mixing keys of a recipe: MixUp 0.2 and CutMix 1.0, half the batches each."""

    mixup, cutmix, mix_switch_prob = 0.2, 1.0, 0.5


def check_evaluation(folder: Path, size: int, device: torch.device) -> str:
    """The evaluate stage's timed forward pass on the GPU: logits equal across fp32 and bf16 within bf16's error."""
    model = build_model("flexible_cnn", CLASSES, {"image_size": size, **CONFIG}).to(device).eval()
    _, val = loaders(folder, size, 64, device, torch.Generator().manual_seed(0))
    fp32, bf16 = predict(model, val, device, "fp32").predictions(), predict(model, val, device, "bf16").predictions()
    agree = float((fp32.predicted == bf16.predicted).mean())
    rate = len(val.dataset) / max(bf16.forward_seconds, 1e-9)
    tta = predict(model, val, device, "bf16", tta="hflip")
    both = len(tta.views) == 2 and all(v.shape == tta.views[0].shape for v in tta.views)
    tta_rate = len(val.dataset) / max(tta.forward_seconds, 1e-9)
    return (
        f"evaluation: bf16 and fp32 agree on {agree:.1%} of top-1; bf16 forward {rate:,.0f} images/s; "
        f"hflip test-time views {'computed' if both else 'MISSING'} ({tta_rate:,.0f} images/s)"
    )


def check_resume(folder: Path, size: int, device: torch.device) -> str:
    """A resume state saved on the GPU after epoch 1, loaded into a fresh model: the optimizer's moments land on the
    GPU, and epoch 2 is the uninterrupted run's (deterministic kernels, as the stages ask for)."""
    state = folder.parent / "state.pt"
    fingerprint = {"params": "p", "code": "c", "data": "d"}

    def start():
        generator = seed_everything(0)
        train, val = loaders(folder, size, 64, device, generator)
        model = build_model("flexible_cnn", CLASSES, {"image_size": size, **CONFIG})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model.to(device)
        ema = WeightAverage(model, 0.9).to(device)
        run = ResumeRun.begin(state, fingerprint, model, optimizer, scheduler, None, generator, ema)
        epochs = fit(model, optimizer, train, val, 2, device, start_epoch=run.start_epoch, scheduler=scheduler, ema=ema)
        return model, optimizer, run, run.continued(epochs)

    state.unlink(missing_ok=True)
    model, _, run, history = start()
    first = next(history)
    progress = Progress(epochs=2)
    progress.update(first)
    run.save(model, model.state_dict(), progress, [first], 0.0)
    second = next(history)
    first_ema = run.ema

    resumed, optimizer, run, history = start()
    devices = {s["exp_avg"].device.type for s in optimizer.state.values()}
    again = next(history)
    same = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values(), strict=True)
    )
    averaged = (first_ema.state_dict(), run.ema.state_dict())
    same_ema = all(torch.equal(a, b) for a, b in zip(*(d.values() for d in averaged), strict=True))
    assert run.start_epoch == 1 and devices == {device.type}, (run.start_epoch, devices)
    return (
        f"resume on the GPU: optimizer state on {sorted(devices)}; epoch 2 train loss {second.train_loss:.6f} "
        f"uninterrupted, {again.train_loss:.6f} resumed; weights {'identical' if same else 'DIFFERENT'}, "
        f"EMA weights {'identical' if same_ema else 'DIFFERENT'}; val accuracy (of the EMA) {second.val_accuracy:.4f} "
        f"and {again.val_accuracy:.4f}"
    )


def ddp_worker(folder: Path, size: int) -> None:
    """Under torchrun: join the NCCL group, train two epochs with the sharded sampler, report from rank 0."""
    device = distributed.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    generator = seed_everything(0)
    train_set = PreparedDataset(folder, "train", BatchResize(size))
    batches = distributed.ShardedBatches(len(train_set), 64, seed=0)
    train = NormalizedLoader(
        make_loader(train_set, 64, batch_sampler=batches, generator=generator, device=device),
        [0.3] * 3,
        [0.25] * 3,
        device,
    )
    val_set = PreparedDataset(folder, "val", BatchResize(size))
    val = NormalizedLoader(
        make_loader(val_set, 64 // distributed.world_size(), sampler=distributed.Shard(len(val_set)), device=device),
        [0.3] * 3,
        [0.25] * 3,
        device,
    )
    model = build_model("flexible_cnn", CLASSES, {"image_size": size, **CONFIG})
    net = distributed.wrap(model, device, channels_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = list(fit(net, optimizer, train, val, 2, device, precision="bf16", channels_last=True))
    loss, _ = evaluate(net, val, torch.nn.CrossEntropyLoss(), device, "bf16", True)
    if distributed.is_main():
        print(
            json.dumps(
                {
                    "backend": torch.distributed.get_backend(),
                    "world": distributed.world_size(),
                    "epochs": len(history),
                    "val_loss": loss,
                    "device": str(device),
                }
            )
        )


def check_ddp(folder: Path, size: int) -> str:
    gpus = max(torch.cuda.device_count(), 1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        __file__,
        "--ddp-worker",
        str(folder),
        "--size",
        str(size),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    if result.returncode != 0:
        return f"DDP under torchrun FAILED:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return f"DDP under torchrun on {gpus} GPU(s): {report}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per setting")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.size)
        return
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this benchmark checks the GPU paths")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    print(f"{name}, torch {torch.__version__}, auto precision -> {resolve_precision(device, 'auto')}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "prepared"
        write_prepared(folder, args.images, args.size)
        rates = {name: step_rate(224, args.batch, device, setting, args.steps) for name, setting in SETTINGS.items()}
        print(f"\ntraining steps, FlexibleCNN (the report's), 224 px, batch {args.batch}, batches on the GPU")
        print(f"{'setting':<32} {'images/s':>10} {'vs fp32':>8}")
        for name, rate in rates.items():
            print(f"{name:<32} {rate:10,.0f} {rate / rates['fp32']:7.2f}x")
        rate = loader_rate(folder, args.size, args.batch, device)
        strong = loader_rate(folder, args.size, args.batch, device, recipe2=True)
        print(
            f"\nwhole epochs through the loader (4 workers), {args.size} px, bf16 + channels_last: {rate:,.0f} images/s"
            f"\nthe same with TrivialAugmentWide + random erasing in the loader, MixUp/CutMix + EMA in the loop: "
            f"{strong:,.0f} images/s ({strong / rate:.2f}x)"
        )
        print()
        for check in (check_evaluation, check_resume):
            print(check(folder, args.size, device))
        print(check_ddp(folder, args.size))


if __name__ == "__main__":
    main()
