"""The tracked training run: loaders over the prepared images, and `fit` wired to dvclive, the best-on-val
checkpoint, early stopping, a wall-time budget and resume states.

`train_with_recipe` builds the recipe around a model and runs the dvclive-free loop of loop.py through
`train_tracked`, which transfer learning shares (its own optimizer and loop phases). Two small values say what a run
is about: a ModelSpec (what the model is) and RunOutputs (where the run writes). When the run ends, a temperature
that calibrates the best weights' probabilities is fitted on the validation subset (Calibration) and stored in the
checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from inatpipe import paths
from inatpipe.checkpoint import ModelSpec, save_checkpoint
from inatpipe.cores import loader_workers
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import read_classes
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.stats import read_stats
from inatpipe.data.transforms import BatchResize, training_transform
from inatpipe.models import count_parameters
from inatpipe.params import DataParams, RecipeParams
from inatpipe.training import distributed
from inatpipe.training.calibration import TemperatureFit
from inatpipe.training.ema import WeightAverage, weight_average
from inatpipe.training.loop import EpochMetrics, fit, logits_on
from inatpipe.training.mixing import Mixer, batch_mixer
from inatpipe.training.precision import emulated_bf16_warning, grad_scaler, resolve_precision
from inatpipe.training.recipe import Progress, build_optimizer, build_scheduler, training_loss
from inatpipe.training.resume import Resumable, ResumeRun, fingerprint


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    train: Iterable
    val: Iterable

    def spec(self, name: str, config: dict[str, Any]) -> ModelSpec:
        """What a model of registry `name` and `config` trained on these data is."""
        return ModelSpec(name, config, self.classes, self.image_size, self.mean, self.std)


@dataclass(frozen=True)
class RunOutputs:
    """Where a training run writes: its dvclive folder, its best checkpoint and, to resume after a kill, its resume
    state (None: the run does not resume)."""

    live_dir: Path
    checkpoint: Path
    resume: Resumable | None = None

    @classmethod
    def of_stage(cls, model: str) -> RunOutputs:
        """The outputs of stage train_<model>, as dvc.yaml declares them, resumable."""
        stage = f"train_{model}"
        resume = Resumable(paths.resume_state(model), stage)
        return cls(paths.train_metrics_dir(model), paths.checkpoint(model), resume)


def training_data(data: DataParams, batch_size: int, generator: torch.Generator, device: torch.device) -> TrainingData:
    """Loaders over the prepared train and val images (augmented per epoch, as uint8), normalised per batch on
    `device` with the train-subset statistics."""
    classes = read_classes(paths.SPLIT_DIR / "classes.json")
    stats = read_stats(paths.STATS_FILE, data.image_size)
    read_meta(paths.PREPARED_DIR, data.image_size)
    mean, std = stats["mean"], stats["std"]
    plain = BatchResize(data.image_size)
    train_set = PreparedDataset(paths.PREPARED_DIR, "train", training_transform(data))
    val_set = PreparedDataset(paths.PREPARED_DIR, "val", plain)
    loader_args = {"num_workers": loader_workers(data.num_workers), "generator": generator, "device": device}
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


@dataclass(frozen=True)
class Calibration:
    """What the temperature is fitted on once training ends: `module` maps the batches of `val`, the loader the run
    validates on, to logits (the model itself, or its head on stored backbone features), on `device` in the run's
    precision and memory layout."""

    module: nn.Module
    val: Iterable
    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False


# A run's epochs from `start_epoch` + 1 to its last: the loop a resumed run continues (fit, or fit in phases).
History = Callable[[int], Iterator[EpochMetrics]]
# One more reader of each finished epoch besides early stopping and the budget (a sweep's pruner): returns a reason
# to stop after this epoch (it becomes the run's stop.reason), or None to go on.
Judge = Callable[[EpochMetrics], str | None]


@dataclass(frozen=True)
class Optimization:
    """What training steps besides the model, and a resume state restores: optimizer, per-batch schedule, fp16's
    loss scaler (None in other precisions) and the weight average (None without `ema`); and how batches are mixed
    (None without MixUp and CutMix), whose draws the saved RNG states cover."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    ema: WeightAverage | None = None
    mix: Mixer | None = None

    @classmethod
    def of_recipe(
        cls,
        model: nn.Module,
        recipe: RecipeParams,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        num_classes: int,
    ) -> Optimization:
        """`optimizer` and `scheduler` with the recipe's loss scaler, weight average of `model` and batch mixing."""
        return cls(
            optimizer,
            scheduler,
            grad_scaler(device, recipe.precision),
            weight_average(model, recipe.ema),
            batch_mixer(recipe, num_classes),
        )

    def kept(self, module: nn.Module) -> nn.Module:
        """The weights of `module` that are validated and saved: its average with `ema`, else its own."""
        return module if self.ema is None else self.ema.counterpart(module)


def train_with_recipe(
    model: nn.Module,
    spec: ModelSpec,
    data: TrainingData,
    recipe: RecipeParams,
    device: torch.device,
    outputs: RunOutputs,
    summary: dict[str, Any] | None = None,
    judges: Sequence[Judge] = (),
) -> dict[str, Any]:
    """Build the recipe's optimizer, schedule and loss around `model`, run `fit`, and track it (`judges` may stop it
    after any epoch); returns the summary."""
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=len(data.train))
    steps = Optimization.of_recipe(model, recipe, optimizer, scheduler, device, len(data.classes))

    def history(start_epoch: int) -> Iterator[EpochMetrics]:
        net = distributed.wrap(model, device, recipe.channels_last)
        return fit_recipe(net, recipe, steps, data.train, data.val, device, start_epoch=start_epoch)

    calibration = Calibration(model, data.val, device, recipe.precision, recipe.channels_last)
    return train_tracked(
        model,
        spec,
        recipe,
        steps,
        history,
        data.train.generator,
        device,
        outputs,
        summary,
        judges=judges,
        calibration=calibration,
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
        mix=steps.mix,
        ema=steps.ema,
    )


def train_tracked(
    model: nn.Module,
    spec: ModelSpec,
    recipe: RecipeParams,
    steps: Optimization,
    history: History,
    generator: torch.Generator,
    device: torch.device,
    outputs: RunOutputs,
    summary: dict[str, Any] | None = None,
    *,
    judges: Sequence[Judge] = (),
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Run `history` from the first epoch, or, when `outputs` has a matching resume state, from the epoch after its
    own (its model, `steps` and RNGs restored, `generator` the training loader's), and track it, calibrating the
    best weights on `calibration` at the end; returns the summary."""
    for line in recipe.adjustments():
        tqdm.write(line)
    if slow := emulated_bf16_warning(device, recipe.precision, recipe.key("precision")):
        tqdm.write(slow)
    run = _resume_run(outputs.resume, model, steps, generator, device)
    progress = Progress(epochs=recipe.epochs, patience=recipe.patience, max_seconds=recipe.max_minutes * 60)
    # What ran: `auto` precision resolved for this device, and on how many processes (torchrun)
    ran = {"precision": resolve_precision(device, recipe.precision), "processes": distributed.world_size()}
    summary = {**ran, **(summary or {})}
    start = run.start_epoch if run else 0
    kept = steps.kept  # the weights validated, saved and calibrated: the average with `ema`
    if calibration is not None:
        calibration = dataclasses.replace(calibration, module=kept(calibration.module))
    return track(
        model,
        history(start),
        spec,
        outputs,
        progress,
        resume=run,
        summary=summary,
        judges=judges,
        calibration=calibration,
        kept=kept(model),
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
    current = fingerprint(resume, device)
    # Optimizer state loads onto its parameters' device: on a GPU, the parameters must be there first, or the first
    # step would mix CPU moments with GPU weights (fit moves the model, not the optimizer state).
    model.to(device)
    if steps.ema is not None:
        steps.ema.to(device)
    return ResumeRun.begin(
        resume.path, current, model, steps.optimizer, steps.scheduler, steps.scaler, generator, steps.ema
    )


def track(
    model: nn.Module,
    history: Iterable[EpochMetrics],
    spec: ModelSpec,
    outputs: RunOutputs,
    progress: Progress,
    *,
    resume: ResumeRun | None = None,
    summary: dict[str, Any] | None = None,
    judges: Sequence[Judge] = (),
    calibration: Calibration | None = None,
    kept: nn.Module | None = None,
) -> dict[str, Any]:
    """Consume `history` epoch by epoch: log to dvclive (step = epoch), keep the best-on-val checkpoint, and stop
    when `progress` says so (early stopping, wall-time budget) or one of `judges` does (a sweep's pruner). Then,
    with `calibration`, fit the temperature of the best weights and store it in the checkpoint. With `resume`, save
    a resume state after every epoch, and continue the run it started from; the state is removed only once the
    calibrated checkpoint is written. `kept`: the weights validated and checkpointed, when not `model`'s own (its
    weight average). Returns the run's summary metrics. Under torchrun only rank 0 writes and prints; the others
    follow its decision to stop, and lend their share of the validation logits."""
    run = _Tracker(model, spec, outputs, progress, resume, judges, kept)
    if not distributed.is_main():
        run.follow(history)
        run.calibrate(calibration)
        return {}
    with Live(str(outputs.live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        run.replay(live)
        for m in run.continued(history):
            run.record(live, m)
            if distributed.agree(progress.should_stop):
                tqdm.write(run.stop_line())
                break
            run.save_state()  # last, so the RNG states it saves are those the next epoch starts from
        live.summary.update(run.summary(summary))
        live.summary.update(run.calibrate(calibration))
        live.make_summary()
    run.finish()
    return dict(live.summary)


class _Tracker:
    """The bookkeeping of one tracked run: its epochs so far, the best weights, elapsed time and resume state."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        outputs: RunOutputs,
        progress: Progress,
        resume: ResumeRun | None,
        judges: Sequence[Judge] = (),
        kept: nn.Module | None = None,
    ):
        self.model, self.spec, self.outputs, self.resume, self.judges = model, spec, outputs, resume, judges
        self.kept = model if kept is None else kept
        self.total, self.trainable = count_parameters(model)
        self.progress, self.logged, self.best_model, elapsed_before = progress, [], {}, 0.0
        self.temperature = 1.0  # until `calibrate` fits one
        if resume and resume.start:
            start = resume.start
            self.progress, self.logged, self.best_model = start.progress, list(start.history), start.best_model
            elapsed_before = start.elapsed_seconds
        self.started = time.perf_counter() - elapsed_before

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def continued(self, history: Iterable[EpochMetrics]) -> Iterable[EpochMetrics]:
        """`history`, with a resumed run's RNGs restored right before its first epoch."""
        return self.resume.continued(history) if self.resume and self.resume.start else history

    def follow(self, history: Iterable[EpochMetrics]) -> None:
        """A rank other than 0: train, and stop when rank 0 does."""
        for m in self.continued(history):
            if self.progress.update(m, self.elapsed()):  # the same on every rank: val metrics are reduced over all
                self.keep_best()
            if distributed.agree(self.progress.should_stop):
                break

    def replay(self, live: Live) -> None:
        """A resumed run's epochs so far: its curves continue with no step missing or repeated, and its best
        checkpoint, which DVC deleted before rerunning the stage, is written again."""
        if not self.logged:
            return
        for m in self.logged:
            _log_epoch(live, m)
        self.save_best(self.best_model)
        tqdm.write(
            f"resuming from epoch {self.progress.last_epoch} of {self.progress.epochs} (state saved in "
            f"{self.resume.path})"
        )

    def record(self, live: Live, m: EpochMetrics) -> None:
        _log_epoch(live, m)
        self.logged.append(m)
        improved = self.progress.update(m, self.elapsed())
        for judge in self.judges:
            reason = judge(m)
            if reason and not self.progress.should_stop and m.epoch < self.progress.epochs:
                self.progress.stop_reason = reason
        if improved:
            self.save_best()
            self.keep_best()
        tqdm.write(
            f"epoch {m.epoch}/{self.progress.epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}  "
            f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f}  lr {m.lr:.2e}  {m.seconds:.1f}s"
            f"{'  *best' if improved else ''}"
        )

    def keep_best(self) -> None:
        """A copy of the weights as they are now, the best so far: a resume state saves them, and the temperature
        is fitted on them once the run ends."""
        self.best_model = {k: v.detach().cpu().clone() for k, v in self.kept.state_dict().items()}

    def save_best(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        extra = {
            "epoch": self.progress.best_epoch,
            "val_accuracy": self.progress.best_val_accuracy,
            "params_trainable": self.trainable,
        }
        weights = weights or self.kept.state_dict()
        save_checkpoint(self.outputs.checkpoint, self.spec, weights, extra, temperature=self.temperature)

    def calibrate(self, calibration: Calibration | None) -> dict[str, Any]:
        """Fit the temperature on the best weights' validation logits and rewrite the best checkpoint with it;
        returns the fit for the summary (rank 0: the others only lend their logits, and get {})."""
        if calibration is None or not self.best_model:
            return {}
        last = {k: v.detach().clone() for k, v in self.kept.state_dict().items()}
        self.kept.load_state_dict(self.best_model)
        c = calibration
        logits, targets = logits_on(c.module, c.val, c.device, c.precision, c.channels_last)
        self.kept.load_state_dict(last)  # the caller keeps the model as training left it
        if not distributed.is_main():
            return {}
        fit = TemperatureFit.of(logits, targets)
        self.temperature = fit.temperature
        self.save_best(self.best_model)
        tqdm.write(
            f"temperature {fit.temperature:.3f} fitted on {len(targets)} val images: ECE {fit.ece_uncalibrated:.4f} "
            f"-> {fit.ece:.4f}, loss {fit.loss_uncalibrated:.4f} -> {fit.loss:.4f}"
        )
        return {"calibration": fit.summary("val")}

    def save_state(self) -> None:
        if self.resume:
            self.resume.save(self.model, self.best_model, self.progress, self.logged, self.elapsed())

    def stop_line(self) -> str:
        p = self.progress
        why = {
            "early_stopping": f"no better val accuracy for {p.patience} epochs",
            "time_budget": f"another epoch would end past the {p.max_seconds / 60:g}-minute budget",
            "pruned": "the sweep's pruner judged the trial hopeless",
        }.get(p.stop_reason, p.stop_reason)
        return (
            f"stopping after epoch {p.last_epoch} of {p.epochs}: {why}; "
            f"keeping epoch {p.best_epoch} (val acc {p.best_val_accuracy:.4f})"
        )

    def summary(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        p = self.progress
        return {
            "best": {"epoch": p.best_epoch, "val_accuracy": p.best_val_accuracy, "val_loss": p.best_val_loss},
            "stop": {"epoch": p.last_epoch, "reason": p.stop_reason},
            "train_seconds": round(self.elapsed(), 2),
            "params_total": self.total,
            "params_trainable": self.trainable,
            **(extra or {}),
        }

    def finish(self) -> None:
        if self.resume:
            self.resume.finish()


def _log_epoch(live: Live, m: EpochMetrics) -> None:
    live.step = m.epoch
    live.log_metric("train/loss", m.train_loss)
    live.log_metric("train/accuracy", m.train_accuracy)
    live.log_metric("train/lr", m.lr)
    live.log_metric("val/loss", m.val_loss)
    live.log_metric("val/accuracy", m.val_accuracy)
