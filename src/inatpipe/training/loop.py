"""The training loop: one epoch of training, one pass of evaluation, and `fit`, which yields per-epoch metrics.

It knows nothing of params.yaml, logging or checkpoints: callers build the model, optimizer, schedule and loaders,
and decide what to do with each epoch's metrics (early stopping included).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm import tqdm

from inatpipe.errors import UserError
from inatpipe.runtime import compiled
from inatpipe.training.distributed import all_reduce_sums, gather_rows, set_epoch
from inatpipe.training.ema import WeightAverage
from inatpipe.training.mixing import Mixer
from inatpipe.training.precision import autocast, grad_scaler, memory_format, to_device


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    lr: float  # learning rate of the epoch's last batch (first parameter group)


@contextlib.contextmanager
def _compile_errors() -> Iterator[None]:
    """torch.compile compiles at the first call; a platform where it cannot (no C++ compiler for inductor on the
    CPU, no Triton on the GPU) fails there, which the user fixes by turning `compile` off."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(
            f"train.compile / resnet.compile: true needs a working C++ compiler for torch.compile ({reason}); "
            "set it to false"
        ) from None


def _update(
    model: nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One optimizer step from `loss`: backward, optional gradient-norm clipping, step, then the per-batch schedule."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # so clipping sees the true gradients
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    if scheduler is not None:
        scheduler.step()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    desc: str = "train",
    scheduler: LRScheduler | None = None,
    grad_clip: float = 0.0,
    precision: str = "fp32",
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    mix: Mixer | None = None,
    ema: WeightAverage | None = None,
) -> tuple[float, float, float]:
    """One pass over `loader`; returns (mean loss, accuracy) over the samples seen, and the last batch's rate.

    `mix` mixes each batch (MixUp, CutMix) into soft targets for the loss; accuracy stays against each image's own
    class. `ema` blends the weights in after every optimizer step."""
    model.train()
    loss_sum, correct, seen, lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=desc, unit="batch", disable=None, leave=False)
    for x, y in bar:
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        x, targets = mix(x, y) if mix is not None else (x, y)
        with autocast(device, precision):
            logits = model(x)
            loss = loss_fn(logits, targets)
        lr = optimizer.param_groups[0]["lr"]
        _update(model, loss, optimizer, scheduler, grad_clip, scaler)
        if ema is not None:
            ema.update()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2e}")
    loss_sum, correct, seen = all_reduce_sums(loss_sum, correct, seen, device=device)  # over ranks, under torchrun
    return loss_sum / seen, correct / seen, lr


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on `loader`, in eval mode."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", unit="batch", disable=None, leave=False):
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    loss_sum, correct, seen = all_reduce_sums(loss_sum, correct, seen, device=device)
    return loss_sum / seen, correct / seen


@torch.no_grad()
def logits_on(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits in float64, targets) of `model` in eval mode over `loader`, on the CPU; under torchrun, every rank's
    share gathered on every rank."""
    model.eval()
    logits, targets = [], []
    for x, y in tqdm(loader, desc="logits", unit="batch", disable=None, leave=False):
        with autocast(device, precision):
            out = model(to_device(x, device, channels_last))
        logits.append(out.double().cpu())
        targets.append(y.cpu())
    return gather_rows(torch.cat(logits)), gather_rows(torch.cat(targets))


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    val_loader: DataLoader,
    epochs: int,
    device: torch.device,
    loss_fn: nn.Module | None = None,
    start_epoch: int = 0,
    scheduler: LRScheduler | None = None,
    grad_clip: float = 0.0,
    precision: str = "fp32",
    channels_last: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    compile: bool = False,
    mix: Mixer | None = None,
    ema: WeightAverage | None = None,
) -> Iterator[EpochMetrics]:
    """Train for epochs start_epoch+1 .. epochs, yielding each epoch's train and validation metrics.

    `loss_fn` is the training loss (label smoothing lives there); validation loss is plain cross-entropy, so it
    stays comparable between runs with different smoothing. `scheduler` is stepped after every batch. `precision`
    (fp32, bf16, fp16) autocasts forward passes; `channels_last` keeps images and weights in NHWC layout, which the
    CPU and GPU convolution kernels run faster on. `scaler`: fp16's loss scaler, for a caller that keeps its state
    (a resumed run); made here when None. `compile` runs training and evaluation through torch.compile; `model`
    itself stays uncompiled, so its state_dict is what callers save. `mix` mixes training batches (training/
    mixing.py); with `ema` (training/ema.py), validation scores the averaged weights, not the raw ones.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    val_loss_fn = nn.CrossEntropyLoss()
    # Moves parameters in place, so an optimizer built before this call still holds them.
    model.to(device, memory_format=memory_format(channels_last))
    if ema is not None:
        ema.to(device, memory_format(channels_last))
    if scaler is None:
        scaler = grad_scaler(device, precision)
    # The compiled wrapper shares the model's parameters, so the optimizer trains them; its state_dict keys gain an
    # `_orig_mod.` prefix, which is why callers save `model`, never the wrapper.
    runner = compiled(model) if compile else model
    validated = runner if ema is None else ema.counterpart(model)
    guard = _compile_errors if compile else contextlib.nullcontext  # only a compiling run needs torch._dynamo loaded
    for epoch in range(start_epoch + 1, epochs + 1):
        start = time.perf_counter()
        set_epoch(train_loader, epoch)  # a sharded shuffle depends on the epoch, also when a resumed run starts late
        with guard():
            train_loss, train_acc, lr = train_one_epoch(
                runner,
                train_loader,
                optimizer,
                loss_fn,
                device,
                f"epoch {epoch}/{epochs}",
                scheduler,
                grad_clip,
                precision,
                channels_last,
                scaler,
                mix,
                ema,
            )
            val_loss, val_acc = evaluate(validated, val_loader, val_loss_fn, device, precision, channels_last)
        yield EpochMetrics(epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - start, lr)
