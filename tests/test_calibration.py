"""Temperature scaling (fitted at the end of training, stored in the checkpoint, applied by evaluate and predict)
and test-time augmentation (the mean probabilities of each image and its mirror), against computations by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inatpipe.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, temperature_of
from inatpipe.cli import main
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import prepare
from inatpipe.data.transforms import BatchResize
from inatpipe.evaluation.metrics import evaluate_checkpoint
from inatpipe.models import build_model
from inatpipe.training.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrated_logits,
    expected_calibration_error,
    fit_temperature,
)
from inatpipe.training.tracking import RunOutputs, TrainingData, train_with_recipe

from .conftest import MEAN, STD, folder_loader, write_image_folder
from .test_recipe import RECIPE

CONFIG = {"image_size": 16, "num_filters": (4, 8), "dense_neurons": 16, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]
SPEC = ModelSpec("flexible_cnn", CONFIG, CLASSES, 16, MEAN, STD)
CPU = torch.device("cpu")
TTAS = ("none", "hflip")


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def grid_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The NLL-minimising T by brute force in numpy, a second and independent fit: the best of a coarse geometric
    grid over the whole range, then of a fine one (steps of 0.1%) between its neighbours."""

    def best(grid: np.ndarray) -> int:
        return int(np.argmin([-np.log(softmax(logits / t)[np.arange(len(targets)), targets]).mean() for t in grid]))

    coarse = np.geomspace(MIN_TEMPERATURE, MAX_TEMPERATURE, 121)  # steps of 5%
    i = best(coarse)
    fine = np.geomspace(coarse[max(i - 1, 0)], coarse[min(i + 1, len(coarse) - 1)], 101)
    return float(fine[best(fine)])


def ece(probs: np.ndarray, targets: np.ndarray) -> float:
    return expected_calibration_error(probs.max(1), probs.argmax(1) == targets)


def calibrated_sample(n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a perfectly calibrated model: each label drawn from the softmax of its own logits."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    return logits, torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_the_fit_recovers_a_known_temperature_and_agrees_with_brute_force(scale: float):
    """Calibrated logits multiplied by 3 (over-confident) or 0.4 (under-confident): T comes back as that factor."""
    logits, targets = calibrated_sample()
    t = fit_temperature(logits * scale, targets)
    assert t == pytest.approx(scale, rel=0.08)
    assert t == pytest.approx(grid_temperature((logits * scale).numpy(), targets.numpy()), rel=3e-3)


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_temperature_lowers_ece_and_never_changes_the_argmax(scale: float):
    logits, targets = calibrated_sample(seed=1)
    skewed = logits * scale
    t = fit_temperature(skewed, targets)
    before = ece(softmax(skewed.numpy()), targets.numpy())
    after = ece(softmax(skewed.numpy() / t), targets.numpy())
    assert before > 0.1 and after < 0.03 and after < before / 4
    for temperature in (t, 0.1, 7.0):
        assert torch.equal(calibrated_logits([skewed], temperature).argmax(1), skewed.argmax(1))


def test_views_average_probabilities_at_the_temperature():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 5 for _ in range(2))
    scores = calibrated_logits([a, b], 2.5)
    expected = (softmax(a.numpy() / 2.5) + softmax(b.numpy() / 2.5)) / 2
    np.testing.assert_allclose(scores.softmax(1).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(scores.exp().sum(1).numpy(), 1.0, rtol=1e-12)  # log-probabilities themselves


# A tiny FlexibleCNN with random weights, saved with a temperature, scored on prepared test images.


def prepared_test(folder: Path, out: Path) -> tuple[Path, torch.Tensor]:
    """folder/<class>/* prepared as the `prepare` stage does: (the prepared folder, its test images normalised by
    hand, in the order evaluate scores them)."""
    prepare({"test": scan_folder(folder)}, CLASSES, 16, out)
    images = BatchResize(16)(torch.from_numpy(np.load(out / "test.npy")).permute(0, 3, 1, 2)).float() / 255
    return out, (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def saved_model(path: Path, temperature: float | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("flexible_cnn", len(CLASSES), CONFIG).eval()
    save_checkpoint(path, SPEC, model.state_dict(), temperature=1.0 if temperature is None else temperature)
    if temperature is None:  # as written before temperatures were stored
        payload = torch.load(path, weights_only=True)
        del payload["temperature"]
        torch.save(payload, path)
    return model


def by_hand(model: torch.nn.Module, x: torch.Tensor, temperature: float, tta: str) -> np.ndarray:
    with torch.no_grad():
        views = [model(x)] + ([model(x.flip(3))] if tta == "hflip" else [])
    return np.mean([softmax(v.double().numpy() / temperature) for v in views], axis=0)


@pytest.mark.parametrize(("tta", "calibrate"), [("none", True), ("hflip", True), ("hflip", False)])
def test_evaluate_applies_the_temperature_to_each_view_and_averages(tmp_path: Path, tta: str, calibrate: bool):
    model = saved_model(tmp_path / "m.pt", temperature=2.5)
    prepared, x = prepared_test(write_image_folder(tmp_path / "test", per_class=3), tmp_path / "prepared")
    m, pred, _ = evaluate_checkpoint(tmp_path / "m.pt", prepared, 4, CPU, tta=tta, calibrate=calibrate)
    expected = by_hand(model, x, 2.5 if calibrate else 1.0, tta)
    np.testing.assert_allclose(pred.logits.softmax(1).numpy(), expected, atol=1e-6)
    targets = pred.targets
    assert m["loss"] == pytest.approx(-np.log(expected[np.arange(len(targets)), targets]).mean(), abs=1e-6)
    plain = by_hand(model, x, 1.0, tta)
    assert m["loss_uncalibrated"] == pytest.approx(-np.log(plain[np.arange(len(targets)), targets]).mean(), abs=1e-6)
    assert m["ece_uncalibrated"] == pytest.approx(ece(plain, targets), abs=1e-6)
    assert m["temperature"] == 2.5 and m["accuracy"] == pytest.approx((expected.argmax(1) == targets).mean())
    if tta == "hflip":  # random weights see a mirror as another image: the views really differ
        assert not np.allclose(expected, by_hand(model, x, 2.5 if calibrate else 1.0, "none"), atol=1e-3)


def write_symmetric_folder(root: Path, per_class: int = 2) -> Path:
    rng = np.random.default_rng(3)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            half = rng.integers(0, 255, size=(16, 8, 3), dtype=np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(root / name / f"{i}.png")
    return root


def test_hflip_changes_nothing_on_mirror_symmetric_images(tmp_path: Path, capsys):
    saved_model(tmp_path / "m.pt", temperature=1.7)
    folder = write_symmetric_folder(tmp_path / "symmetric")
    prepared, _ = prepared_test(folder, tmp_path / "prepared")
    scores = {tta: evaluate_checkpoint(tmp_path / "m.pt", prepared, 4, CPU, tta=tta)[1].logits for tta in TTAS}
    torch.testing.assert_close(scores["hflip"].softmax(1), scores["none"].softmax(1), atol=1e-6, rtol=0)
    outputs = {}
    for tta in TTAS:  # and `inatpipe predict --tta` the same
        main(["predict", "--model", str(tmp_path / "m.pt"), str(folder), "--precision", "fp32", "--tta", tta])
        outputs[tta] = capsys.readouterr().out
    assert outputs["hflip"] == outputs["none"] and outputs["none"].count("\n") == 6


def test_a_checkpoint_without_a_temperature_loads_and_evaluates_at_1(tmp_path: Path):
    model = saved_model(tmp_path / "old.pt", temperature=None)
    loaded, meta = load_checkpoint(tmp_path / "old.pt")
    assert "temperature" not in meta and temperature_of(meta) == 1.0
    prepared, x = prepared_test(write_image_folder(tmp_path / "test", per_class=2), tmp_path / "prepared")
    m, pred, _ = evaluate_checkpoint(tmp_path / "old.pt", prepared, 4, CPU)
    with torch.no_grad():
        torch.testing.assert_close(pred.logits, model(x).double(), atol=1e-5, rtol=1e-5)
    assert m["temperature"] == 1.0 and m["ece"] == m["ece_uncalibrated"] and m["loss"] == m["loss_uncalibrated"]


def test_predict_applies_the_stored_temperature_unless_told_not_to(tmp_path: Path, capsys):
    model = saved_model(tmp_path / "m.pt", temperature=3.0)
    folder = write_image_folder(tmp_path / "new", per_class=1)
    _, x = prepared_test(folder, tmp_path / "prepared")
    shown = {}
    for flag in ([], ["--no-calibrate"]):
        out = tmp_path / f"pred{len(flag)}.csv"
        main(
            ["predict", "--model", str(tmp_path / "m.pt"), str(folder), "--precision", "fp32", "--csv", str(out)] + flag
        )
        capsys.readouterr()
        rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
        shown[bool(flag)] = np.array([float(r[2]) for r in rows])  # top-1 probability, files in sorted order
    for plain, temperature in ((False, 3.0), (True, 1.0)):
        np.testing.assert_allclose(shown[plain], by_hand(model, x, temperature, "none").max(1), atol=2e-6)


# Training: the temperature fitted on the validation subset once the run ends, stored in the checkpoint.


def mislabelled_folder(root: Path, seed: int) -> Path:
    """Three colour-coded classes, 4 images each, one of them filed under the wrong class: a model can't get them
    all right, so the likelihood has its maximum at a temperature inside the search range, not at its bound."""
    folder = write_image_folder(root, per_class=4, seed=seed)
    (folder / "cat" / "000.png").rename(folder / "dog" / "wrong.png")
    return folder


def test_a_trained_model_stores_the_temperature_of_its_best_weights_on_val(tmp_path: Path, dataset: Path):
    """The fitted T is the one a brute-force fit finds on the best checkpoint's validation logits; the training
    metrics hold it with the val ECE and loss before and after, and scoring other images with it lowers their ECE
    and loss at the same accuracy."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train = folder_loader(dataset / "train", CLASSES, shuffle=True, generator=generator)
    data = TrainingData(CLASSES, 16, MEAN, STD, train, folder_loader(mislabelled_folder(tmp_path / "val", 1), CLASSES))
    recipe = dataclasses.replace(RECIPE, epochs=3, warmup_epochs=0.0, label_smoothing=0.2)
    model = build_model("flexible_cnn", 3, CONFIG)
    outputs = RunOutputs(tmp_path / "live", tmp_path / "best.pt")
    summary = train_with_recipe(model, data.spec("flexible_cnn", CONFIG), data, recipe, CPU, outputs)

    best, meta = load_checkpoint(tmp_path / "best.pt")
    with torch.no_grad():
        val = [(best(x), y) for x, y in data.val]
    logits = torch.cat([z for z, _ in val]).double().numpy()
    targets = torch.cat([y for _, y in val]).numpy()
    t = meta["temperature"]
    assert MIN_TEMPERATURE * 1.01 < t < MAX_TEMPERATURE / 1.01, t
    assert t == pytest.approx(grid_temperature(logits, targets), rel=2e-3)
    fitted = json.loads((tmp_path / "live" / "metrics.json").read_text())["calibration"]
    assert fitted == summary["calibration"] and fitted["temperature"] == t
    assert fitted["val_ece_uncalibrated"] == pytest.approx(ece(softmax(logits), targets))
    assert fitted["val_ece"] == pytest.approx(ece(softmax(logits / t), targets))
    assert fitted["val_loss"] < fitted["val_loss_uncalibrated"]

    prepared, _ = prepared_test(mislabelled_folder(tmp_path / "test", 9), tmp_path / "prepared")
    m, _, _ = evaluate_checkpoint(tmp_path / "best.pt", prepared, 8, CPU)
    plain, _, _ = evaluate_checkpoint(tmp_path / "best.pt", prepared, 8, CPU, calibrate=False)
    assert m["ece"] <= m["ece_uncalibrated"] == plain["ece"] and m["accuracy"] == plain["accuracy"]
    assert m["loss"] <= m["loss_uncalibrated"] == plain["loss"] and m["temperature"] == t
