"""What the training stages share: loaders from the split and stats files, and a tracked run of `fit`.

`train_with_recipe` builds the recipe around a model and runs the dvclive-free loop in `training.py` through
`train_tracked`, which transfer learning shares (its own optimizer and loop phases): resume states, then `track`,
which logs each epoch to dvclive, keeps the best-on-val checkpoint, stops early, and returns the run's summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from inatpipe import distributed
from inatpipe.checkpoint import save_checkpoint
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import read_classes
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.stats import read_stats
from inatpipe.data.transforms import BatchAugment, BatchResize
from inatpipe.models import count_parameters
from inatpipe.params import DataParams, RecipeParams
from inatpipe.paths import PREPARED_DIR, SPLIT_DIR, STATS_FILE
from inatpipe.recipe import Progress, build_optimizer, build_scheduler, training_loss
from inatpipe.resume import Resumable, ResumeRun, fingerprint
from inatpipe.runtime import resolve_num_workers
from inatpipe.training import EpochMetrics, fit, grad_scaler, resolve_precision


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    train: NormalizedLoader
    val: NormalizedLoader


def training_data(data: DataParams, batch_size: int, generator: torch.Generator, device: torch.device) -> TrainingData:
    """Loaders over the prepared train and val images (augmented per epoch, as uint8), normalised per batch on
    `device` with the train-subset statistics."""
    classes = read_classes(SPLIT_DIR / "classes.json")
    stats = read_stats(STATS_FILE, data.image_size)
    read_meta(PREPARED_DIR, data.image_size)
    mean, std = stats["mean"], stats["std"]
    plain = BatchResize(data.image_size)
    augmented = BatchAugment(data.image_size, hflip=data.hflip, rotation=data.rotation, crop_scale=data.crop_scale)
    train_set = PreparedDataset(PREPARED_DIR, "train", augmented if data.augment else plain)
    val_set = PreparedDataset(PREPARED_DIR, "val", plain)
    loader_args = {"num_workers": resolve_num_workers(data.num_workers), "generator": generator, "device": device}
    if distributed.active():  # under torchrun: each rank loads its share of every batch, and of the val subset
        seed = generator.initial_seed()
        train = make_loader(
            train_set,
            batch_size,
            batch_sampler=distributed.ShardedBatches(len(train_set), batch_size, seed),
            **loader_args,
        )
        val = make_loader(
            val_set, batch_size // distributed.world_size(), sampler=distributed.Shard(len(val_set)), **loader_args
        )
    else:
        train = make_loader(train_set, batch_size, shuffle=True, **loader_args)
        val = make_loader(val_set, batch_size, **loader_args)
    return TrainingData(
        classes=classes,
        image_size=data.image_size,
        mean=mean,
        std=std,
        train=NormalizedLoader(train, mean, std, device),
        val=NormalizedLoader(val, mean, std, device),
    )


# A run's epochs from `start_epoch` + 1 to its last: the loop a resumed run continues (fit, or fit in phases).
History = Callable[[int], Iterator[EpochMetrics]]


@dataclass(frozen=True)
class Optimization:
    """What training steps besides the model, and a resume state restores: optimizer, per-batch schedule and
    fp16's loss scaler (None in other precisions)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None


def train_with_recipe(
    model: nn.Module,
    data: TrainingData,
    recipe: RecipeParams,
    *,
    device: torch.device,
    live_dir: Path,
    checkpoint: Path,
    model_name: str,
    model_config: dict,
    summary: dict[str, Any] | None = None,
    resume: Resumable | None = None,
) -> dict[str, Any]:
    """Build the recipe's optimizer, schedule and loss around `model`, run `fit`, and track it; returns the summary.

    With `resume`, the run saves a resume state after every epoch and continues from a matching one it finds.
    """
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=len(data.train))
    steps = Optimization(optimizer, scheduler, grad_scaler(device, recipe.precision))

    def history(start_epoch: int) -> Iterator[EpochMetrics]:
        net = distributed.wrap(model, device, recipe.channels_last)
        return fit_recipe(net, recipe, steps, data.train, data.val, device, start_epoch=start_epoch)

    return train_tracked(
        model,
        data,
        recipe,
        steps,
        history,
        generator=data.train.generator,
        device=device,
        live_dir=live_dir,
        checkpoint=checkpoint,
        model_name=model_name,
        model_config=model_config,
        summary=summary,
        resume=resume,
    )


def fit_recipe(
    model: nn.Module,
    recipe: RecipeParams,
    steps: Optimization,
    train: Iterable,
    val: Iterable,
    device: torch.device,
    *,
    start_epoch: int = 0,
    epochs: int | None = None,
    channels_last: bool | None = None,
) -> Iterator[EpochMetrics]:
    """`fit` with the recipe's loss, clipping and precision, stepping `steps`: epochs `start_epoch` + 1 to `epochs`
    (default: the recipe's); `channels_last` defaults to the recipe's (images only: features are plain vectors)."""
    return fit(
        model,
        steps.optimizer,
        train,
        val,
        recipe.epochs if epochs is None else epochs,
        device,
        loss_fn=training_loss(recipe),
        start_epoch=start_epoch,
        scheduler=steps.scheduler,
        grad_clip=recipe.grad_clip,
        precision=recipe.precision,
        channels_last=recipe.channels_last if channels_last is None else channels_last,
        scaler=steps.scaler,
        compile=recipe.compile,
    )


def train_tracked(
    model: nn.Module,
    data: TrainingData,
    recipe: RecipeParams,
    steps: Optimization,
    history: History,
    *,
    generator: torch.Generator,
    device: torch.device,
    live_dir: Path,
    checkpoint: Path,
    model_name: str,
    model_config: dict,
    summary: dict[str, Any] | None = None,
    resume: Resumable | None = None,
) -> dict[str, Any]:
    """Run `history` from the first epoch, or with `resume` from the epoch after a matching resume state's (its
    model, `steps` and RNGs restored, `generator` the training loader's), and track it; returns the summary."""
    run = _resume_run(resume, model, steps, generator, device)
    return track(
        model,
        history(run.start_epoch if run else 0),
        data,
        epochs=recipe.epochs,
        patience=recipe.patience,
        max_minutes=recipe.max_minutes,
        live_dir=live_dir,
        checkpoint=checkpoint,
        model_name=model_name,
        model_config=model_config,
        # What ran: `auto` precision resolved for this device
        summary={"precision": resolve_precision(device, recipe.precision), **(summary or {})},
        resume=run,
    )


def _resume_run(
    resume: Resumable | None,
    model: nn.Module,
    steps: Optimization,
    generator: torch.Generator,
    device: torch.device,
) -> ResumeRun | None:
    if resume is None:
        return None
    # The training images are the prepared arrays: their labels and metadata by content, the arrays by size and time.
    prepared = [PREPARED_DIR / name for name in ("meta.json", "train_labels.npy", "val_labels.npy")]
    data_files = [SPLIT_DIR / "classes.json", STATS_FILE, *prepared]
    arrays = [str(PREPARED_DIR / f"{subset}.npy") for subset in ("train", "val")]
    current = fingerprint(resume, device, data_files, [*arrays, *map(str, resume.large_files)])
    # Optimizer state loads onto its parameters' device: on a GPU, the parameters must be there first, or the first
    # step would mix CPU moments with GPU weights (fit moves the model, not the optimizer state).
    model.to(device)
    return ResumeRun.begin(resume.path, current, model, steps.optimizer, steps.scheduler, steps.scaler, generator)


def track(
    model: nn.Module,
    history: Iterable[EpochMetrics],
    data: TrainingData,
    *,
    epochs: int,
    patience: int,
    live_dir: Path,
    checkpoint: Path,
    model_name: str,
    model_config: dict,
    max_minutes: float = 0.0,
    summary: dict[str, Any] | None = None,
    resume: ResumeRun | None = None,
) -> dict[str, Any]:
    """Consume `history` epoch by epoch: log to dvclive (step = epoch), save the best-on-val checkpoint, and stop
    early after `patience` epochs without improvement or before an epoch that would end past `max_minutes`
    (0: neither). With `resume`, save a resume state after every epoch, and continue the run it started from.
    Returns the run's summary metrics. Under torchrun only rank 0 writes and prints; the others follow its decision
    to stop."""
    total, trainable = count_parameters(model)
    progress = Progress(epochs=epochs, patience=patience, max_seconds=max_minutes * 60)
    logged: list[EpochMetrics] = []
    best_model: dict[str, torch.Tensor] = {}
    elapsed_before = 0.0
    if resume and resume.start:
        progress, logged, best_model = resume.start.progress, list(resume.start.history), resume.start.best_model
        elapsed_before = resume.start.elapsed_seconds
        history = resume.continued(history)
    start = time.perf_counter() - elapsed_before
    if not distributed.is_main():
        for m in history:
            progress.update(m, time.perf_counter() - start)
            if distributed.agree(progress.should_stop):
                break
        return {}

    def save_best(weights: dict[str, torch.Tensor] | None = None) -> None:
        save_checkpoint(
            checkpoint,
            model,
            model_name=model_name,
            model_config=model_config,
            classes=data.classes,
            image_size=data.image_size,
            mean=data.mean,
            std=data.std,
            extra={
                "epoch": progress.best_epoch,
                "val_accuracy": progress.best_val_accuracy,
                "params_trainable": trainable,
            },
            state_dict=weights,
        )

    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        if logged:  # the interrupted run's epochs: its curves continue with no step missing or repeated
            for m in logged:
                _log_epoch(live, m)
            save_best(best_model)  # DVC deleted the checkpoint before rerunning the stage
            tqdm.write(f"resuming from epoch {progress.last_epoch} of {epochs} (state saved in {resume.path})")
        for m in history:
            _log_epoch(live, m)
            logged.append(m)
            improved = progress.update(m, time.perf_counter() - start)
            if improved:
                save_best()
                if resume:
                    best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            tqdm.write(
                f"epoch {m.epoch}/{epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}  "
                f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f}  lr {m.lr:.2e}  {m.seconds:.1f}s"
                f"{'  *best' if improved else ''}"
            )
            if distributed.agree(progress.should_stop):
                why = {
                    "early_stopping": f"no better val accuracy for {patience} epochs",
                    "time_budget": f"another epoch would end past the {max_minutes:g}-minute budget",
                }[progress.stop_reason]
                tqdm.write(
                    f"stopping after epoch {m.epoch} of {epochs}: {why}; "
                    f"keeping epoch {progress.best_epoch} (val acc {progress.best_val_accuracy:.4f})"
                )
                break
            if resume:  # last, so the RNG states it saves are those the next epoch starts from
                resume.save(model, best_model, progress, logged, time.perf_counter() - start)
        live.summary.update(
            {
                "best": {
                    "epoch": progress.best_epoch,
                    "val_accuracy": progress.best_val_accuracy,
                    "val_loss": progress.best_val_loss,
                },
                "stop": {"epoch": progress.last_epoch, "reason": progress.stop_reason},
                "train_seconds": round(time.perf_counter() - start, 2),
                "params_total": total,
                "params_trainable": trainable,
                **(summary or {}),
            }
        )
        live.make_summary()
    if resume:
        resume.finish()
    return dict(live.summary)


def _log_epoch(live: Live, m: EpochMetrics) -> None:
    live.step = m.epoch
    live.log_metric("train/loss", m.train_loss)
    live.log_metric("train/accuracy", m.train_accuracy)
    live.log_metric("train/lr", m.lr)
    live.log_metric("val/loss", m.val_loss)
    live.log_metric("val/accuracy", m.val_accuracy)
