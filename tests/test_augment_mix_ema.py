"""Recipe 2 on training batches: augmentation policies and random erasing (in the loader), MixUp and CutMix (in the
loop), and the exponential moving average of the weights that is validated and checkpointed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from inatpipe.checkpoint import load_checkpoint
from inatpipe.data.transforms import BatchAugment, BatchErase, BatchPolicy, BatchResize, Chain, training_transform
from inatpipe.models import build_model
from inatpipe.params import DataParams
from inatpipe.training.calibration import TemperatureFit
from inatpipe.training.ema import WeightAverage
from inatpipe.training.loop import evaluate, logits_on
from inatpipe.training.mixing import batch_mixer
from inatpipe.training.tracking import RunOutputs, train_with_recipe

from .test_recipe import CONFIG, recipe, tiny_loaders

DATA = DataParams(
    root="data",
    train_dir="train",
    test_dir="val",
    val_fraction=0.2,
    image_size=16,
    augment=True,
    hflip=True,
    rotation=10.0,
    crop_scale=0.8,
    policy="basic",
    random_erasing=0.0,
    num_workers=0,
    max_bad_fraction=0.05,
)


def flat_batch(n: int = 16, size: int = 16) -> torch.Tensor:
    """n copies of one mid-grey image with a gradient, uint8 (n, 3, size, size)."""
    ramp = torch.linspace(60, 200, size).round().to(torch.uint8)
    return ramp.view(1, 1, 1, size).expand(n, 3, size, size).clone()


def test_training_transform_chains_what_data_asks_for_and_nothing_without_augment():
    assert isinstance(training_transform(DATA), BatchAugment)
    chained = training_transform(dataclasses.replace(DATA, policy="randaugment", random_erasing=0.25))
    assert isinstance(chained, Chain)
    assert [type(step) for step in chained.steps] == [BatchAugment, BatchPolicy, BatchErase]
    assert chained.steps[1].name == "randaugment" and chained.steps[2].p == 0.25
    plain = training_transform(dataclasses.replace(DATA, augment=False, policy="trivialaugment", random_erasing=0.5))
    assert isinstance(plain, BatchResize)


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment"])
def test_a_policy_draws_for_each_image_of_a_batch_on_its_own(name: str):
    torch.manual_seed(0)
    x = flat_batch(32)
    out = BatchPolicy(name)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    distinct = {tuple(img.flatten().tolist()) for img in out}
    assert len(distinct) > 8  # one draw per batch would give one image, 32 times
    torch.manual_seed(0)
    assert torch.equal(BatchPolicy(name)(x), out)  # the draws come from torch's seeded generator


def test_random_erasing_boxes_each_image_within_the_area_range():
    torch.manual_seed(0)
    x = flat_batch(64)
    assert torch.equal(BatchErase(0.0)(x), x)
    out = BatchErase(1.0)(x)
    changed = (out != x).any(dim=1)  # (n, h, w): the erased pixels (noise equal to the pixel is rare)
    areas = changed.flatten(1).sum(1).float() / (16 * 16)
    assert bool((areas > 0).all()), "p = 1 erases every image"
    # The box covers 2%-33% of the image, sides rounded to whole pixels.
    assert float(areas.max()) <= 0.45 and float(areas.min()) >= 0.01
    rows, cols = changed.any(2), changed.any(1)
    for r, c, mask in zip(rows, cols, changed, strict=True):  # one rectangle per image
        assert int(mask.sum()) <= int(r.sum()) * int(c.sum()) and int(r.sum()) * int(c.sum()) - int(mask.sum()) <= 3
    assert len({(tuple(r.tolist()), tuple(c.tolist())) for r, c in zip(rows, cols, strict=True)}) > 20
    torch.manual_seed(1)
    half = BatchErase(0.5)(x)
    share = float((half != x).flatten(1).any(1).float().mean())
    assert 0.25 < share < 0.75


def test_mixup_mixes_each_image_with_its_neighbour_and_the_targets_alike():
    torch.manual_seed(0)
    mix = batch_mixer(recipe(mixup=0.4), num_classes=3)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, targets = mix(x, y)
    assert targets.shape == (6, 3) and torch.allclose(targets.sum(1), torch.ones(6))
    lam = float(targets[0, 0])  # image 0 (class 0) mixed with image 5 (class 2): the batch rolled by one
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert torch.allclose(targets[0], torch.tensor([lam, 0.0, 1 - lam]))


def test_cutmix_pastes_a_box_of_the_neighbour_with_targets_in_proportion_to_its_area():
    torch.manual_seed(3)
    mix = batch_mixer(recipe(cutmix=1.0), num_classes=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    mixed, targets = mix(x, y)
    own = (mixed == x).all(1)  # (n, h, w): pixels left as they were
    pasted = (mixed == x.roll(1, 0)).all(1)
    assert bool((own | pasted).all())
    share = float((~own[1]).float().mean())  # image 1 (class 1) got a box of image 0 (class 0)
    assert math.isclose(float(targets[1, 0]), share, abs_tol=1e-6) and math.isclose(float(targets[1, 1]), 1 - share)


def test_with_both_on_the_switch_probability_picks_cutmix_or_mixup_per_batch():
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    always_cut = batch_mixer(recipe(mixup=0.4, cutmix=1.0, mix_switch_prob=1.0), num_classes=3)
    for _ in range(5):
        mixed, _ = always_cut(x, y)
        assert bool(((mixed == x) | (mixed == x.roll(1, 0))).all())  # CutMix: every pixel from one image
    never_cut = batch_mixer(recipe(mixup=0.4, cutmix=1.0, mix_switch_prob=0.0), num_classes=3)
    mixed, targets = never_cut(x, y)
    lam = float(targets[1, 1])  # image 1 (class 1) mixed with image 0 (class 0)
    assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert batch_mixer(recipe(), num_classes=3) is None


def test_the_weight_average_warms_up_then_decays_at_its_rate():
    source = nn.Linear(2, 1, bias=False)
    ema = WeightAverage(source, decay=0.5)
    expected = None
    for n in range(6):
        with torch.no_grad():
            source.weight.fill_(float(n + 1))
        ema.update()
        w = float(n + 1)
        decay = min(0.5, (1 + n) / (10 + n))  # after n earlier updates
        expected = w if expected is None else decay * expected + (1 - decay) * w
        assert torch.allclose(ema.model.weight, torch.full((1, 2), expected))
    assert int(ema.state_dict()["n_averaged"]) == 6


def test_with_ema_the_run_validates_and_checkpoints_the_averaged_weights(tmp_path: Path, dataset: Path):
    torch.manual_seed(0)
    data = tiny_loaders(dataset)
    model = build_model("flexible_cnn", 3, CONFIG)
    spec = data.spec("flexible_cnn", CONFIG)
    r = recipe(epochs=3, warmup_epochs=0.0, ema=0.9, mixup=0.2, cutmix=1.0)
    summary = train_with_recipe(model, spec, data, r, torch.device("cpu"), RunOutputs(tmp_path, tmp_path / "m.pt"))
    saved, meta = load_checkpoint(tmp_path / "m.pt")
    raw = model.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in saved.state_dict().items() if v.is_floating_point())
    # The best epoch's validation accuracy is the averaged model's: evaluating the checkpoint gives it again.
    loss, accuracy = evaluate(saved, data.val, nn.CrossEntropyLoss(), torch.device("cpu"))
    assert accuracy == summary["best"]["val_accuracy"] and math.isclose(loss, summary["best"]["val_loss"], rel_tol=1e-5)
    # ... and the temperature is fitted on the averaged weights the checkpoint holds.
    logits, targets = logits_on(saved, data.val, torch.device("cpu"))
    assert math.isclose(meta["temperature"], TemperatureFit.of(logits, targets).temperature, rel_tol=1e-6)
