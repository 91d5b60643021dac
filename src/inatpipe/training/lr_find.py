"""The learning-rate range test (Smith, 2017; fastai's `lr_find`): a fresh model trains for a few batches at a rate
that grows exponentially from `start` to `end`; the smoothed loss against the rate shows where training is
fastest and where it breaks down, and a suggested peak rate is read off the curve.

`range_test` is the loop, on any model, optimizer and batches; `find_lr` builds them from the params of a training
stage exactly as that stage does (data, augmentation, model, optimizer, loss, precision), so the curve is the one
the stage's first steps would follow at each rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inatpipe import paths
from inatpipe.errors import UserError
from inatpipe.models.resnet import load_pretrained
from inatpipe.params import Params, RecipeParams
from inatpipe.runtime import choose_device, configure_threads, seed_everything
from inatpipe.training.loop import _update
from inatpipe.training.precision import autocast, grad_scaler, memory_format, to_device
from inatpipe.training.recipe import build_optimizer, training_loss
from inatpipe.training.tracking import training_data
from inatpipe.training.transfer import build_finetuning

MODELS = ("flexible", "resnet")
DIVERGE = 4.0  # the test stops once the smoothed loss passes this multiple of its lowest value
MIN_STEPS, MAX_STEPS = 50, 200  # the default number of steps: a share of an epoch, within these bounds
EPOCH_SHARE = 0.25  # ... that share
SMOOTHING_SPAN = 0.05  # the moving average reaches back over about this share of the steps (at least 2 steps)


def default_steps(steps_per_epoch: int) -> int:
    """A quarter of an epoch's batches, at least 50 (fewer points leave too few per decade of rate to read a slope
    off) and at most 200 (more add no resolution worth their time: 25 points per decade over 1e-7 .. 10)."""
    return int(min(MAX_STEPS, max(MIN_STEPS, round(EPOCH_SHARE * steps_per_epoch))))


def smoothing(steps: int) -> float:
    """The moving average's beta: a span of about 5% of the steps. fastai's fixed 0.98 spans 50 batches, half of its
    default 100-step test, which shifts the curve's features to higher rates than those that caused them."""
    return 1 - 1 / max(2.0, SMOOTHING_SPAN * steps)


@dataclass(frozen=True)
class RangeTest:
    """The rates tried, one per step, with each step's batch loss and its moving average (bias-corrected), and
    whether the test stopped early because the loss diverged."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    diverged: bool
    start: float
    end: float
    steps: int  # asked for; len(lrs) ran

    def minimum(self) -> int:
        """The step of the lowest smoothed loss."""
        return int(np.nanargmin(self.smoothed))

    def steepest(self) -> int | None:
        """The step, before the minimum, where the smoothed loss falls fastest per decade of rate; None when the
        loss never fell."""
        low = self.minimum()
        if low < 2:
            return None
        slope = np.gradient(np.asarray(self.smoothed[: low + 1]), np.log10(self.lrs[: low + 1]))
        return int(np.argmin(slope))

    def suggestion(self) -> dict[str, Any]:
        """Two readings of the curve, and the one recommended for the recipe's `learning_rate`.

        `minimum / 10`: a tenth of the rate at the lowest loss, where training still improved fastest but a
        safe distance below where it breaks down. `steepest`: the rate of the steepest fall. The recipe's rate is
        the *peak* of its schedule, reached after the warm-up and held only briefly, so the recommendation is
        `minimum / 10` (the higher of the two in most curves, and the more stable across seeds); `steepest` is
        reported beside it.
        """
        low, steep = self.minimum(), self.steepest()
        out: dict[str, Any] = {
            "minimum": self.lrs[low],
            "minimum_over_10": self.lrs[low] / 10,
            "steepest": self.lrs[steep] if steep is not None else None,
            "recommended": self.lrs[low] / 10,
            "rule": "minimum_over_10",
            "note": "",
        }
        if low < 2:
            out["recommended"], out["rule"] = None, "none"
            out["note"] = f"the loss never fell: start lower than {self.start:g} (--start)"
        elif low == len(self.lrs) - 1 and not self.diverged:
            out["note"] = f"the loss was still falling at {self.end:g}: the suggestion may be low (raise --end)"
        return out

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "steps_run": len(self.lrs), "suggestion": self.suggestion()}


def exponential_rate(step: int, steps: int, start: float, end: float) -> float:
    """Rate of 0-based `step` of `steps`: `start` at the first, `end` at the last, a constant factor in between."""
    return start * (end / start) ** (step / max(1, steps - 1))


def _batches(loader: Iterable) -> Iterator:
    """The loader's batches, epoch after epoch (a small dataset may have fewer batches than the test has steps)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError("the training subset holds no images; run `dvc repro stats` on a dataset that has some")


def range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: Iterable,
    device: torch.device,
    *,
    start: float,
    end: float,
    steps: int,
    precision: str = "fp32",
    channels_last: bool = False,
    grad_clip: float = 0.0,
    diverge: float = DIVERGE,
) -> RangeTest:
    """Train `model` for up to `steps` batches of `batches` (cycled), the rate of step i at
    `exponential_rate(i, ...)`. Parameter groups keep their ratios to the first group (discriminative rates), whose
    rate is the one recorded. Stops early when the smoothed loss passes `diverge` times its lowest or is no number."""
    if steps < 1 or not 0 < start < end:
        raise ValueError("steps >= 1 and 0 < start < end")  # the command checks these; a caller's bug here
    model.to(device, memory_format=memory_format(channels_last)).train()
    ratios = [group["lr"] / optimizer.param_groups[0]["lr"] for group in optimizer.param_groups]
    scaler = grad_scaler(device, precision)
    beta, average, best = smoothing(steps), 0.0, math.inf
    lrs, losses, smoothed, diverged = [], [], [], False
    bar = tqdm(total=steps, desc="lr-find", unit="batch", disable=None, leave=False)
    for step, (x, y) in enumerate(itertools.islice(_batches(batches), steps)):
        lr = exponential_rate(step, steps, start, end)
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(model(x), y)
        _update(model, loss, optimizer, None, grad_clip, scaler)
        value = loss.item()
        average = beta * average + (1 - beta) * value
        smooth = average / (1 - beta ** (step + 1))  # bias correction: the average starts at 0, not at the loss
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        bar.update()
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smooth:.4f}")
        if not math.isfinite(smooth) or smooth > diverge * best:
            diverged = True
            break
    bar.close()
    return RangeTest(lrs, losses, smoothed, diverged, start, end, steps)


@dataclass(frozen=True)
class Setup:
    """What `find_lr` trains, as its training stage would: the model, its optimizer and loss, and the batches."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    batches: Iterable
    recipe: RecipeParams
    device: torch.device

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)


def require_prepared_data() -> None:
    """The range test trains on the pipeline's prepared data; without it, one line saying how to make it."""
    needed = (paths.SPLIT_DIR / "classes.json", paths.PREPARED_DIR / "meta.json", paths.STATS_FILE)
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not found: the range test needs the prepared data; run `dvc repro stats`"
        )


def setup(p: Params, model: str) -> Setup:
    """The model, optimizer, loss and augmented training batches of stage train_<model>, built from `p` as the
    stage builds them (same seed, so the same initial weights and batches)."""
    if model not in MODELS:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    require_prepared_data()
    recipe = p.train if model == "flexible" else p.resnet
    device = choose_device(p.device)
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, recipe.batch_size, generator, device)
    if model == "flexible":
        net = data.spec("flexible_cnn", {"image_size": p.data.image_size, **p.model.architecture()}).build()
        optimizer = build_optimizer(net, recipe)
    else:
        net = data.spec("resnet", {"arch": p.resnet.arch}).build()
        load_pretrained(net, p.resnet.weights, p.resnet.arch, p.resnet.require_pretrained)
        # the layers that train from the first step (staged: the head), at their discriminative rates
        optimizer, _ = build_finetuning(net, p.resnet, steps_per_epoch=len(data.train))
    return Setup(net, optimizer, training_loss(recipe), data.train, recipe, device)


def find_lr(s: Setup, *, start: float, end: float, steps: int) -> RangeTest:
    """`range_test` on a Setup, in its recipe's precision, memory layout and gradient clipping."""
    r = s.recipe
    return range_test(
        s.model,
        s.optimizer,
        s.loss_fn,
        s.batches,
        s.device,
        start=start,
        end=end,
        steps=steps,
        precision=r.precision,
        channels_last=r.channels_last,
        grad_clip=r.grad_clip,
    )
