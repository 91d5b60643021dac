"""The training recipe: optimizers and their parameter groups, learning-rate schedules, label smoothing, early
stopping, gradient clipping, and the tracked run that keeps the best checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from inatpipe.checkpoint import ModelSpec, load_checkpoint
from inatpipe.models import build_model
from inatpipe.params import TrainParams
from inatpipe.training.loop import EpochMetrics, _update, fit
from inatpipe.training.recipe import Progress, build_optimizer, build_scheduler, parameter_groups, training_loss
from inatpipe.training.tracking import RunOutputs, TrainingData, track, train_with_recipe

from .conftest import MEAN, STD, folder_loader

CONFIG = {"image_size": 16, "num_filters": (4, 8), "dense_neurons": 16, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]
RECIPE = TrainParams(
    epochs=10,
    batch_size=8,
    optimizer="adamw",
    learning_rate=1e-2,
    weight_decay=0.05,
    scheduler="cosine",
    warmup_epochs=2.0,
    label_smoothing=0.0,
    mixup=0.0,
    cutmix=0.0,
    mix_switch_prob=0.5,
    ema=0.0,
    patience=0,
    grad_clip=0.0,
    max_minutes=0.0,
    precision="fp32",
    channels_last=False,
    compile=False,
)


def recipe(**changes) -> TrainParams:
    return dataclasses.replace(RECIPE, **changes)


def lr_curve(r: TrainParams, steps_per_epoch: int = 10) -> list[float]:
    """The rate of every batch of a run, read off a real optimizer as the training loop steps the schedule."""
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, r)
    scheduler = build_scheduler(optimizer, r, steps_per_epoch)
    rates = []
    for _ in range(r.epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_rises_linearly_to_the_peak_then_cosine_ends_near_zero():
    rates = lr_curve(recipe(scheduler="cosine", warmup_epochs=2.0))
    peak = RECIPE.learning_rate
    assert rates[0] == pytest.approx(peak / 20)  # 20 warm-up batches
    assert rates[:20] == pytest.approx([peak * (i + 1) / 20 for i in range(20)])
    assert rates[19] == pytest.approx(peak) and max(rates) == pytest.approx(peak)
    assert all(a >= b for a, b in zip(rates[20:], rates[21:], strict=False)), "cosine only falls after warm-up"
    assert rates[-1] < peak * 1e-3
    assert rates[60] == pytest.approx(peak / 2)  # halfway through the 80 cosine batches


def test_constant_schedule_holds_the_peak_after_a_fractional_warmup():
    rates = lr_curve(recipe(scheduler="constant", warmup_epochs=0.5))
    assert rates[:5] == pytest.approx([RECIPE.learning_rate * (i + 1) / 5 for i in range(5)])
    assert rates[5:] == pytest.approx([RECIPE.learning_rate] * 95)
    assert lr_curve(recipe(scheduler="constant", warmup_epochs=0.0)) == pytest.approx([RECIPE.learning_rate] * 100)


@pytest.mark.parametrize(("warmup_epochs", "peak_step"), [(3.0, 30), (0.0, 30), (1.5, 15)])
def test_onecycle_peaks_where_configured(warmup_epochs, peak_step):
    rates = lr_curve(recipe(scheduler="onecycle", warmup_epochs=warmup_epochs))
    assert max(range(len(rates)), key=rates.__getitem__) == peak_step  # warmup 0: 30% of the 100 batches
    assert rates[peak_step] == pytest.approx(RECIPE.learning_rate)
    assert rates[0] == pytest.approx(RECIPE.learning_rate / 25)
    assert rates[-1] == pytest.approx(RECIPE.learning_rate / 250_000)


def test_adamw_leaves_biases_and_norm_layers_undecayed():
    model = build_model("flexible_cnn", 3, {**CONFIG, "batch_norm": True})
    optimizer = build_optimizer(model, recipe(optimizer="adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, undecayed = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decayed["params"])  # conv and linear
    expected = {n for n, p in model.named_parameters() if n.endswith("bias") or p.ndim == 1}
    assert {names[id(p)] for p in undecayed["params"]} == expected
    assert any(".1.weight" in n for n in expected), "batch norm scales are among them"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_adam_and_sgd_decay_every_weight_as_l2(name, cls):
    model = build_model("flexible_cnn", 3, CONFIG)
    optimizer = build_optimizer(model, recipe(optimizer=name))
    assert type(optimizer) is cls and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.05 and len(group["params"]) == len(list(model.parameters()))
    if name == "sgd":
        assert group["momentum"] == 0.9 and group["nesterov"] is True


def test_frozen_parameters_never_reach_the_optimizer():
    model = build_model("flexible_cnn", 3, CONFIG)
    model.features.requires_grad_(False)
    groups = parameter_groups(model, 0.1, exclude_norm_and_bias=True)
    trainable = {id(p) for p in model.head.parameters()}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def test_label_smoothing_reaches_the_training_loss():
    logits = torch.tensor([[10.0, -10.0, -10.0]])
    target = torch.tensor([0])
    assert training_loss(recipe(label_smoothing=0.0))(logits, target).item() < 1e-6
    smoothed = training_loss(recipe(label_smoothing=0.3))(logits, target).item()
    # 0.3 of the target mass is spread over all 3 classes: two of them each get 0.1 at log-probability about -20.
    assert smoothed == pytest.approx(0.2 * 20, rel=1e-3)


def test_fit_with_label_smoothing_reports_a_higher_train_loss_but_a_plain_val_loss(dataset: Path):
    def first_epoch(smoothing: float) -> EpochMetrics:
        torch.manual_seed(0)
        loader = tiny_loaders(dataset)
        model = build_model("flexible_cnn", 3, CONFIG)
        r = recipe(label_smoothing=smoothing, learning_rate=1e-9, weight_decay=0.0)  # weights barely move
        optimizer = build_optimizer(model, r)
        history = fit(model, optimizer, loader.train, loader.val, 1, torch.device("cpu"), loss_fn=training_loss(r))
        return next(history)

    plain, smoothed = first_epoch(0.0), first_epoch(0.5)
    assert smoothed.train_loss != pytest.approx(plain.train_loss, rel=1e-3)
    assert smoothed.val_loss == pytest.approx(plain.val_loss, rel=1e-5)


def test_gradient_clipping_bounds_the_gradient_norm_of_each_step(dataset: Path):
    x, y = next(iter(tiny_loaders(dataset).train))

    def grad_norm_after_step(grad_clip: float) -> float:
        torch.manual_seed(0)
        model = build_model("flexible_cnn", 3, CONFIG)
        optimizer = build_optimizer(model, recipe(optimizer="sgd", learning_rate=0.1))
        _update(model, nn.functional.cross_entropy(model(x), y), optimizer, None, grad_clip)
        return nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()

    unclipped = grad_norm_after_step(0.0)
    assert unclipped > 0.1
    assert grad_norm_after_step(0.05) == pytest.approx(0.05, rel=1e-4)
    assert grad_norm_after_step(unclipped * 2) == pytest.approx(unclipped, rel=1e-6)  # a loose cap changes nothing


def scripted(accuracies: list[float], losses: list[float] | None = None, seconds: float = 0.1) -> list[EpochMetrics]:
    losses = losses or [1.0] * len(accuracies)
    return [
        EpochMetrics(i + 1, 1.0, 0.5, loss, acc, seconds, 1e-3)
        for i, (acc, loss) in enumerate(zip(accuracies, losses, strict=True))
    ]


@pytest.mark.parametrize(
    ("accuracies", "patience", "stop_epoch", "best_epoch", "reason"),
    [
        ([0.5, 0.7, 0.6, 0.65, 0.7, 0.9, 0.95], 3, 5, 2, "early_stopping"),  # equal accuracy is no improvement
        ([0.5, 0.7, 0.6, 0.8, 0.7, 0.75, 0.9], 2, 6, 4, "early_stopping"),
        ([0.5, 0.7, 0.6, 0.8, 0.7, 0.75], 2, 6, 4, "completed"),  # patience runs out at the last epoch anyway
        ([0.5, 0.4, 0.3, 0.2], 0, 4, 1, "completed"),  # patience 0: never stop
        ([0.1, 0.2, 0.3], 1, 3, 3, "completed"),
    ],
)
def test_early_stopping_stops_at_the_right_epoch(accuracies, patience, stop_epoch, best_epoch, reason):
    progress = Progress(epochs=len(accuracies), patience=patience)
    seen = []
    for m in scripted(accuracies):
        progress.update(m)
        seen.append(m.epoch)
        if progress.should_stop:
            break
    assert seen[-1] == progress.last_epoch == stop_epoch
    assert (progress.best_epoch, progress.stop_reason) == (best_epoch, reason)


def test_equal_accuracy_with_lower_loss_counts_as_better():
    progress = Progress(epochs=3, patience=1)
    for m in scripted([0.8, 0.8], losses=[0.5, 0.4]):
        progress.update(m)
    assert progress.best_epoch == 2 and not progress.should_stop


@pytest.mark.parametrize(
    ("max_seconds", "stop_epoch", "reason"),
    [(35.0, 3, "time_budget"), (40.0, 4, "time_budget"), (0.0, 6, "completed"), (1000.0, 6, "completed")],
)
def test_time_budget_stops_before_an_epoch_that_would_overrun_it(max_seconds, stop_epoch, reason):
    """Epochs of 10 s: epoch k ends at 10k s, and the next is expected to take as long as the last one."""
    progress = Progress(epochs=6, max_seconds=max_seconds)
    for m in scripted([0.1, 0.2, 0.3, 0.25, 0.5, 0.6], seconds=10.0):
        progress.update(m, elapsed_seconds=10.0 * m.epoch)
        if progress.should_stop:
            break
    assert (progress.last_epoch, progress.stop_reason) == (stop_epoch, reason)
    assert progress.best_epoch == min(stop_epoch, 3) if stop_epoch < 5 else progress.best_epoch == 6


def tiny_loaders(dataset: Path, batch_size: int = 8) -> TrainingData:
    generator = torch.Generator().manual_seed(0)
    train = folder_loader(dataset / "train", CLASSES, batch_size=batch_size, shuffle=True, generator=generator)
    val = folder_loader(dataset / "val", CLASSES, batch_size=batch_size)
    return TrainingData(CLASSES, 16, MEAN, STD, train, val)


def test_track_stops_early_and_keeps_the_best_epochs_weights(tmp_path: Path):
    """A scripted history whose model weights change every epoch: the checkpoint holds the best epoch's weights."""
    model = build_model("flexible_cnn", 3, CONFIG)
    accuracies = [0.4, 0.9, 0.6, 0.8, 0.85, 0.99]

    def history():
        for m in scripted(accuracies):
            with torch.no_grad():
                model.head[-1].bias.fill_(m.epoch)  # marks the weights with the epoch that produced them
            yield m

    spec = ModelSpec("flexible_cnn", CONFIG, ["a", "b", "c"], 16, MEAN, STD)
    outputs = RunOutputs(tmp_path / "live", tmp_path / "best.pt")
    summary = track(model, history(), spec, outputs, Progress(epochs=len(accuracies), patience=3))
    assert summary["stop"] == {"epoch": 5, "reason": "early_stopping"}
    assert summary["best"]["epoch"] == 2 and summary["best"]["val_accuracy"] == 0.9
    restored, meta = load_checkpoint(tmp_path / "best.pt")
    assert torch.all(restored.head[-1].bias == 2) and meta["extra"]["epoch"] == 2
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["stop"]["reason"] == "early_stopping"
    logged = (tmp_path / "live" / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()
    assert logged[0] == "step\tlr" and len(logged) == 1 + 5  # one rate per epoch run, none after the stop
    assert math.isclose(float(logged[1].split("\t")[1]), 1e-3)


def test_a_compiled_run_learns_and_checkpoints_the_plain_model(tmp_path: Path, dataset: Path):
    """recipe.compile trains through torch.compile; the optimizer moves the model's own weights, and the checkpoint
    holds the uncompiled model's keys (no `_orig_mod.` prefix), so it rebuilds as any other."""
    torch.manual_seed(0)
    # One conv block, no batch norm: the fewest kernels for inductor to generate and compile with the C++ compiler,
    # which takes most of this test's time.
    config = {**CONFIG, "num_filters": (4,), "batch_norm": False}
    model = build_model("flexible_cnn", 3, config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = tiny_loaders(dataset, batch_size=6)  # 30 train, 12 val images: no short last batch to compile for
    train_with_recipe(
        model,
        data.spec("flexible_cnn", config),
        data,
        recipe(epochs=3, warmup_epochs=0.0, compile=True),
        torch.device("cpu"),
        RunOutputs(tmp_path / "live", tmp_path / "best.pt"),
    )
    logged = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(line.split("\t")[1]) for line in logged]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    saved = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    assert list(saved) == list(initial)
    assert not torch.equal(saved["features.0.weight"], initial["features.0.weight"])
    restored, _ = load_checkpoint(tmp_path / "best.pt")
    assert list(restored.state_dict()) == list(initial)


def test_a_tracked_run_logs_each_epochs_learning_rate(tmp_path: Path, dataset: Path):
    """The curve `dvc plots show` draws as "Learning rate": one point per epoch, the rate of its last batch."""
    torch.manual_seed(0)
    data = tiny_loaders(dataset)
    model = build_model("flexible_cnn", 3, CONFIG)
    r = recipe(epochs=3, warmup_epochs=0.0, scheduler="cosine", learning_rate=1e-2)
    train_with_recipe(
        model, data.spec("flexible_cnn", CONFIG), data, r, torch.device("cpu"), RunOutputs(tmp_path, tmp_path / "m.pt")
    )
    tsv = (tmp_path / "plots" / "metrics" / "train" / "lr.tsv").read_text().splitlines()
    steps, rates = zip(*[(int(a), float(b)) for a, b in (line.split("\t") for line in tsv[1:])], strict=True)
    batches = len(data.train)  # 30 images in batches of 8: 4 per epoch
    expected = [1e-2 * (1 + math.cos(math.pi * (e * batches - 1) / (3 * batches))) / 2 for e in (1, 2, 3)]
    assert steps == (1, 2, 3) and rates == pytest.approx(expected)
