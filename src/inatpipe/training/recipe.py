"""The training recipe: optimizer, per-batch learning-rate schedule, loss and early stopping, built from params.

One implementation serves both training stages (`train` and `resnet` share the keys of `RecipeParams`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from inatpipe.params import RecipeParams
from inatpipe.training.loop import EpochMetrics

# Parameters of these layers scale or shift normalised activations: decaying them towards zero fights the
# normalisation instead of regularising the model, so AdamW leaves them (and every bias) undecayed.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
ONECYCLE_DEFAULT_PEAK = 0.3  # share of training before the peak when warmup_epochs is 0, as torch's OneCycleLR
ONECYCLE_START_DIV = 25.0  # onecycle starts at lr / 25 ...
ONECYCLE_END_DIV = 25.0 * 1e4  # ... and ends at lr / 250,000 (the same ratios as torch's OneCycleLR)


def parameter_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict]:
    """The trainable parameters, split into a decayed group and (when asked) an undecayed one for norms and biases."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            skip = exclude_norm_and_bias and (isinstance(module, NORM_LAYERS) or name == "bias")
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, recipe: RecipeParams, groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """Adam and SGD add L2 (weight_decay * w) to every gradient; AdamW decays decoupled, sparing norms and biases.

    `groups`: explicit parameter groups, each of which may set its own `lr` (discriminative fine-tuning);
    by default, the model's trainable parameters at `recipe.learning_rate`."""
    if groups is None:
        groups = parameter_groups(model, recipe.weight_decay, exclude_norm_and_bias=recipe.optimizer == "adamw")
    if not groups:
        raise ValueError("the model has no trainable parameters")  # a bug in the caller, not user input
    lr = recipe.learning_rate
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def lr_factor(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate for 0-based batch `step` of `total_steps`.

    constant: linear warm-up to the peak, then flat. cosine: the same warm-up, then a half cosine to zero at the
    end. onecycle: a half-cosine rise from lr/25 to the peak at `warmup_steps` (30% of training when 0), then a
    half-cosine fall to lr/250,000 (the shape of torch's OneCycleLR, without its momentum cycling).
    """
    if kind == "onecycle":
        peak = warmup_steps or round(ONECYCLE_DEFAULT_PEAK * total_steps)
        if step < peak:
            low = 1 / ONECYCLE_START_DIV
            return low + (1 - low) * (1 - math.cos(math.pi * step / peak)) / 2
        low = 1 / ONECYCLE_END_DIV
        progress = (step - peak) / max(1, total_steps - 1 - peak)
        return low + (1 - low) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return (1 + math.cos(math.pi * min(progress, 1.0))) / 2


def _from_step(step: int, *, start: int, factor: functools.partial) -> float:
    return factor(step) if step >= start else 0.0


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    recipe: RecipeParams,
    steps_per_epoch: int,
    start_steps: list[int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-batch schedule over `recipe.epochs`: step it after every optimizer step.

    `start_steps`, one per parameter group: a group's rate is 0 before its start step, then follows the shared
    schedule from wherever it has got to (the groups a staged fine-tuning unfreezes late)."""
    total = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup * steps_per_epoch)
    factor = functools.partial(lr_factor, kind=recipe.scheduler, warmup_steps=warmup, total_steps=total)
    if start_steps is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if len(start_steps) != len(optimizer.param_groups):
        raise ValueError("one start step per parameter group")  # a bug in the caller, not user input
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [functools.partial(_from_step, start=start, factor=factor) for start in start_steps]
    )


def training_loss(recipe: RecipeParams) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing; validation and test losses stay unsmoothed."""
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def is_better(m: EpochMetrics, best_accuracy: float, best_loss: float) -> bool:
    """Higher validation accuracy wins; at equal accuracy, lower validation loss."""
    return m.val_accuracy > best_accuracy or (m.val_accuracy == best_accuracy and m.val_loss < best_loss)


@dataclass
class Progress:
    """The best epoch so far, and whether and why training should stop; what a run's summary reports."""

    epochs: int  # the planned number of epochs: the epoch cap
    patience: int = 0  # epochs without improvement before stopping; 0 = never
    max_seconds: float = 0.0  # wall-time budget; 0 = none
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0
    last_epoch: int = 0
    stop_reason: str = "completed"  # completed | early_stopping | time_budget | pruned (a sweep's judge)

    def update(self, m: EpochMetrics, elapsed_seconds: float = 0.0) -> bool:
        """Record epoch `m`, which ended `elapsed_seconds` into the run; returns whether it is the new best."""
        self.last_epoch = m.epoch
        improved = is_better(m, self.best_val_accuracy, self.best_val_loss)
        if improved:
            self.best_epoch, self.best_val_accuracy, self.best_val_loss = m.epoch, m.val_accuracy, m.val_loss
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        if m.epoch >= self.epochs:
            return improved
        if self.patience and self.epochs_without_improvement >= self.patience:
            self.stop_reason = "early_stopping"
        # An epoch like the last one would end past the budget: stop now rather than overrun it.
        elif self.max_seconds and elapsed_seconds + m.seconds > self.max_seconds:
            self.stop_reason = "time_budget"
        return improved

    @property
    def should_stop(self) -> bool:
        return self.stop_reason != "completed"
