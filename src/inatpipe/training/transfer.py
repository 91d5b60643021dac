"""Transfer learning with a TransferResNet: which layers train, at which rates, and on what (images or features).

Strategies (resnet.strategy): `head` trains the new classifier alone; `partial` also the last `unfreeze` backbone
stages; `full` every layer; `staged` the head alone for `head_epochs`, then the last `unfreeze` stages too.
Discriminative rates: the head trains at `learning_rate`, and each backbone stage at the rate of the stage above
it times `lr_decay` (layer4 at lr * d, layer3 at lr * d^2, ..., the stem at lr * d^5).
With the whole backbone frozen and no augmentation, the head trains on stored backbone features (features.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from inatpipe.checkpoint import ModelSpec
from inatpipe.data.dataset import make_loader
from inatpipe.models import count_parameters
from inatpipe.models.resnet import STAGES, TransferResNet
from inatpipe.params import ResnetParams
from inatpipe.training.features import BackboneFeatures
from inatpipe.training.loop import EpochMetrics
from inatpipe.training.recipe import build_optimizer, build_scheduler, parameter_groups
from inatpipe.training.tracking import (
    Calibration,
    Optimization,
    RunOutputs,
    TrainingData,
    fit_recipe,
    train_tracked,
)


def stage_rates(recipe: ResnetParams, trainable_stages: int) -> dict[str, float]:
    """Learning rate of the head and of each trainable backbone stage, from the top down."""
    top_down = ["head", *reversed(STAGES[len(STAGES) - trainable_stages :])]
    return {stage: recipe.learning_rate * recipe.lr_decay**depth for depth, stage in enumerate(top_down)}


def discriminative_groups(model: TransferResNet, recipe: ResnetParams, trainable_stages: int) -> list[dict]:
    """Parameter groups of the head and the last `trainable_stages` backbone stages, head first (its rate is the
    one the loop reports), each at its stage's rate and split by weight decay as the recipe does."""
    groups = []
    for stage, lr in stage_rates(recipe, trainable_stages).items():
        modules = nn.ModuleList([model.head] if stage == "head" else model.stage_modules(stage))
        modules.requires_grad_(True)  # staged: stages that join later are frozen now, but their groups exist
        for group in parameter_groups(modules, recipe.weight_decay, exclude_norm_and_bias=recipe.optimizer == "adamw"):
            groups.append({**group, "lr": lr, "stage": stage})
    model.set_trainable_stages(model.trainable_stages)  # restore the freezing the loops above lifted
    return groups


def build_finetuning(
    model: TransferResNet, recipe: ResnetParams, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer over every group the run will train (head first) and one per-batch schedule over the run.

    `staged` holds the backbone groups from the start at rate 0, joining at the switch epoch at their
    discriminative rate times wherever the shared schedule has got to; so one schedule spans the whole run.
    """
    final = recipe.trainable_stages
    model.set_trainable_stages(0 if recipe.strategy == "staged" else final)
    groups = discriminative_groups(model, recipe, final)
    switch_step = recipe.head_phase * steps_per_epoch if recipe.strategy == "staged" else 0
    starts = [0 if g["stage"] == "head" else switch_step for g in groups]
    optimizer = build_optimizer(model, recipe, groups)
    return optimizer, build_scheduler(optimizer, recipe, steps_per_epoch, start_steps=starts)


def finetuning_steps(
    model: TransferResNet, recipe: ResnetParams, steps_per_epoch: int, device: torch.device
) -> Optimization:
    """`build_finetuning`'s optimizer and schedule, with the recipe's loss scaler, weight average and mixing (made
    here so a resume keeps them)."""
    optimizer, scheduler = build_finetuning(model, recipe, steps_per_epoch)
    return Optimization.of_recipe(model, recipe, optimizer, scheduler, device, model.head.out_features)


def finetune_history(
    model: TransferResNet,
    recipe: ResnetParams,
    steps: Optimization,
    train: DataLoader,
    val: DataLoader,
    device: torch.device,
    start_epoch: int = 0,
) -> Iterator[EpochMetrics]:
    """Train on images, the full forward pass every epoch, with the optimizer of `build_finetuning`, from epoch
    `start_epoch` + 1 (a resumed run's next).

    `staged` runs as two consecutive `fit` phases over the one optimizer and schedule: until the switch the late
    stages are frozen (no gradients, BatchNorm statistics untouched); then they train. A run resumed at or after
    the switch starts in the second phase, its stages unfrozen as the uninterrupted run's were. `fit` stays unaware
    of fine-tuning, and the caller sees one history, as from any other run.
    """
    if recipe.strategy != "staged":
        yield from fit_recipe(model, recipe, steps, train, val, device, start_epoch=start_epoch)
        return
    if start_epoch < recipe.head_phase:
        model.set_trainable_stages(0)
        yield from fit_recipe(
            model, recipe, steps, train, val, device, start_epoch=start_epoch, epochs=recipe.head_phase
        )
        unfrozen = ", ".join(STAGES[len(STAGES) - recipe.trainable_stages :])
        tqdm.write(f"staged: head trained for {recipe.head_phase} epochs; from now on {unfrozen} train too")
    model.set_trainable_stages(recipe.trainable_stages)
    yield from fit_recipe(model, recipe, steps, train, val, device, start_epoch=max(start_epoch, recipe.head_phase))


def feature_loaders(
    features: BackboneFeatures, batch_size: int, generator: torch.Generator, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    """Loaders over stored features, batched and shuffled as the image loaders are (same sizes, same generator)."""

    def loader(subset: str, shuffle: bool) -> DataLoader:
        dataset = TensorDataset(features.features[subset], features.targets[subset])
        return make_loader(dataset, batch_size, shuffle=shuffle, generator=generator, device=device)

    return loader("train", True), loader("val", False)


def head_history(
    model: TransferResNet,
    recipe: ResnetParams,
    steps: Optimization,
    train: DataLoader,
    val: DataLoader,
    device: torch.device,
    start_epoch: int = 0,
) -> Iterator[EpochMetrics]:
    """Train the head alone on loaders of backbone features: the same loop, and the optimizer and schedule of
    `build_finetuning`, as on images."""
    model.set_trainable_stages(0)
    # channels_last is for images; features are plain vectors
    return fit_recipe(model.head, recipe, steps, train, val, device, start_epoch=start_epoch, channels_last=False)


def train_transfer(
    model: TransferResNet,
    spec: ModelSpec,
    data: TrainingData,
    recipe: ResnetParams,
    device: torch.device,
    outputs: RunOutputs,
    features: BackboneFeatures | None = None,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train with the recipe's strategy, on `features` when given, else on images; track the run and checkpoint the
    complete model (backbone and head) either way. Returns the run's summary metrics."""
    total, final_trainable = _counts(model, recipe.trainable_stages)
    _, head_trainable = _counts(model, 0)
    if features is not None:
        train, val = feature_loaders(features, recipe.batch_size, data.train.generator, device)
        phases = head_history
        calibration = Calibration(model.head, val, device, recipe.precision)  # features are vectors: no NHWC
    else:
        train, val, phases = data.train, data.val, finetune_history
        calibration = Calibration(model, val, device, recipe.precision, recipe.channels_last)
        rates = stage_rates(recipe, recipe.trainable_stages)
        tqdm.write("learning rates: " + ", ".join(f"{stage} {lr:.2e}" for stage, lr in rates.items()))
    steps = finetuning_steps(model, recipe, len(train), device)
    tqdm.write(f"{recipe.arch}, strategy {recipe.strategy}: {final_trainable:,} of {total:,} parameters train")
    # track counts the trainable parameters as the run starts; staged runs record the final count too, below.
    model.set_trainable_stages(0 if recipe.strategy == "staged" else recipe.trainable_stages)
    counts = {"params_total": total, "params_trainable": final_trainable}
    if recipe.strategy == "staged":
        counts["params_trainable_head_epochs"] = head_trainable

    def history(start_epoch: int) -> Iterator[EpochMetrics]:
        return phases(model, recipe, steps, train, val, device, start_epoch)

    summary = {
        **counts,
        "arch": recipe.arch,
        "strategy": recipe.strategy,
        "unfrozen": ", ".join(STAGES[len(STAGES) - recipe.trainable_stages :][::-1]) or "none",
        **(summary or {}),
    }
    return train_tracked(
        model, spec, recipe, steps, history, train.generator, device, outputs, summary, calibration=calibration
    )


def _counts(model: TransferResNet, trainable_stages: int) -> tuple[int, int]:
    """(total, trainable) parameters with `trainable_stages` stages training; the model's freezing is restored."""
    before = model.trainable_stages
    model.set_trainable_stages(trainable_stages)
    counts = count_parameters(model)
    model.set_trainable_stages(before)
    return counts
