"""`inatpipe lr-find`: the LR range test on tiny generated images, and the command in a copy of the in-process
pipeline's project (conftest's `pipeline`: prepared data and stats, no training needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inatpipe.models import build_model
from inatpipe.params import load_params
from inatpipe.runtime import seed_everything
from inatpipe.training.lr_find import default_steps, range_test, smoothing
from inatpipe.training.recipe import build_optimizer, training_loss

from .conftest import ROOT, Pipeline, folder_loader, write_image_folder
from .stages import inatpipe

pytestmark = pytest.mark.xdist_group("pipeline")  # shares the in-process pipeline with test_stages.py

CLASSES = ["cat", "dog", "owl"]
CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}


def ema(losses: list[float], beta: float) -> np.ndarray:
    """The bias-corrected moving average written out as weighted means: step t weighs loss i by beta^(t-i)."""
    out = []
    for t in range(len(losses)):
        weights = beta ** np.arange(t, -1, -1)
        out.append(float(np.dot(weights, losses[: t + 1]) / weights.sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    """A range test of FlexibleCNN with the shipped recipe (AdamW, label smoothing) on colour-coded classes."""
    folder = write_image_folder(tmp_path_factory.mktemp("lrf") / "train", per_class=12)
    generator = seed_everything(0)
    loader = folder_loader(folder, CLASSES, shuffle=True, generator=generator, augment=True)
    model = build_model("flexible_cnn", 3, CONFIG)
    recipe = load_params(ROOT / "params.yaml").train
    optimizer = build_optimizer(model, recipe)
    test = range_test(
        model, optimizer, training_loss(recipe), loader, torch.device("cpu"), start=1e-5, end=100.0, steps=60
    )
    return test, optimizer


def test_the_loss_falls_then_diverges_at_a_huge_rate(curve):
    test, _ = curve
    smoothed = np.array(test.smoothed)
    low = test.minimum()
    assert smoothed[low] < 0.5 * smoothed[0]  # colour-coded classes: a good rate learns them within a few batches
    assert test.diverged and len(test.lrs) < 60  # stopped early ...
    assert smoothed[-1] > 4 * smoothed[low] or not np.isfinite(smoothed[-1])  # ... because the loss blew up
    assert 0 < low < len(test.lrs) - 1


def test_rates_rise_exponentially_and_the_loss_is_a_corrected_moving_average(curve):
    test, optimizer = curve
    n = len(test.lrs)
    np.testing.assert_allclose(test.lrs, np.geomspace(1e-5, 100.0, 60)[:n], rtol=1e-9)
    assert all(group["lr"] == pytest.approx(test.lrs[-1]) for group in optimizer.param_groups)  # both groups
    finite = np.isfinite(test.losses)
    np.testing.assert_allclose(np.array(test.smoothed)[finite], ema(test.losses, smoothing(60))[finite], rtol=1e-6)


def test_the_suggestion_lies_below_the_divergence_and_inside_the_range(curve):
    test, _ = curve
    s = test.suggestion()
    assert s["rule"] == "minimum_over_10" and s["note"] == ""
    assert s["recommended"] == pytest.approx(test.lrs[test.minimum()] / 10)
    assert 1e-5 < s["recommended"] < s["minimum"] < test.lrs[-1] < 100.0
    assert 1e-5 < s["steepest"] < s["minimum"]
    # the steepest fall: no other point before the minimum falls faster per decade of rate
    low = test.minimum()
    slope = np.diff(test.smoothed[: low + 1]) / np.diff(np.log10(test.lrs[: low + 1]))
    assert min(slope) < 0


def test_discriminative_groups_keep_their_ratios():
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2), torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(
        [{"params": model[1].parameters(), "lr": 1.0}, {"params": model[2].parameters(), "lr": 0.25}]
    )
    batches = [(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]))]
    test = range_test(
        model, optimizer, torch.nn.CrossEntropyLoss(), batches, torch.device("cpu"), start=1e-4, end=1e-2, steps=5
    )
    assert len(test.lrs) == 5 and not test.diverged  # one batch, used again and again
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-2, 0.25e-2])


@pytest.mark.parametrize(("per_epoch", "steps"), [(19, 50), (200, 50), (400, 100), (750, 188), (5000, 200)])
def test_default_steps_are_a_quarter_epoch_within_bounds(per_epoch: int, steps: int):
    assert default_steps(per_epoch) == steps


# --- the command -------------------------------------------------------------------------------------------------


def digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def project(pipeline: Pipeline, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lrf-project") / "p"
    shutil.copytree(pipeline.root, root)
    # the loader in this process: with a few batches per epoch, new worker processes every few steps cost more
    # than the steps themselves
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("num_workers: auto", "num_workers: 0", 1))
    assert load_params(params).data.num_workers == 0
    return root


def test_lr_find_writes_the_curve_and_its_suggestion_and_touches_nothing_else(project: Path):
    owned = [
        project / "params.yaml",
        *sorted((project / "models").iterdir()),
        *sorted((project / "data").rglob("*.png")),
    ]
    before = digest(owned)
    result = inatpipe(project, "lr-find", "--steps", "30", "--start", "1e-5", "--end", "100")
    assert result.returncode == 0, result.stderr
    data = json.loads((project / "reports/lr_find/lr_find.json").read_text())
    rate = data["suggestion"]["recommended"]
    assert f"dvc exp run -S train.learning_rate={rate:.1e}" in result.stdout
    assert 1e-5 < rate < 100 and data["steps"] == 30 and len(data["lrs"]) == len(data["smoothed"]) == data["steps_run"]
    with Image.open(project / "reports/lr_find/lr_find.png") as img:
        assert img.format == "PNG" and img.size == (700, 420)
    assert digest(owned) == before  # params.yaml, models/ and data/ untouched
    assert sorted(p.name for p in (project / "reports/lr_find").iterdir()) == ["lr_find.json", "lr_find.png"]

    again = inatpipe(project, "lr-find", "--steps", "30", "--start", "1e-5", "--end", "100", "--out", "again")
    assert again.returncode == 0, again.stderr
    assert (project / "again/lr_find.json").read_text() == (project / "reports/lr_find/lr_find.json").read_text()


def test_lr_find_on_the_resnet_recipe(project: Path):
    result = inatpipe(project, "lr-find", "--model", "resnet", "--steps", "8", "--out", "resnet_lr")
    assert result.returncode == 0, result.stderr
    data = json.loads((project / "resnet_lr/lr_find.json").read_text())
    assert data["steps_run"] <= 8 and data["lrs"][0] == pytest.approx(1e-7)
    assert "resnet.learning_rate" in result.stdout or "note:" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--steps", "0"), "--steps must be at least 2, got 0"),
        (("--start", "1", "--end", "0.1"), "--start must be above 0 and below --end"),
        (("--start", "0"), "--start must be above 0 and below --end"),
        (("--model", "vgg"), "unknown model 'vgg'; choose one of flexible, resnet"),
    ],
)
def test_bad_input_is_one_line(project: Path, args: tuple[str, ...], message: str):
    result = inatpipe(project, "lr-find", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_without_prepared_data_it_says_to_run_dvc_repro_stats(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = inatpipe(tmp_path, "lr-find")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "run `dvc repro stats`" in lines[0] and "artifacts/stats.json" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
