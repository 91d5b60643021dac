"""The stages' outputs, from the in-process pipeline on a tiny dataset (conftest's `pipeline`): per-image predictions
that `inatpipe predict` reproduces, a comparison that agrees with the evaluations, report images, atomic writes,
and the same metrics from the same params and seed."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from inatpipe.checkpoint import load_checkpoint
from inatpipe.cli import main
from inatpipe.evaluation.figures import CELL_INCHES, DPI, GRADCAM_MISTAKES, GRID_COLUMNS, MISTAKE_COLUMNS

from . import stages
from .conftest import Pipeline
from .project import Project
from .stages import inside

pytestmark = pytest.mark.xdist_group("pipeline")  # its costly fixtures are built once, on one worker

MODELS = ("flexible", "resnet")


def read_json(root: Path, path: str) -> dict:
    return json.loads((root / path).read_text())


@pytest.mark.parametrize("model", MODELS)
def test_predict_over_the_test_folder_gives_evaluates_top1_image_by_image(pipeline: Pipeline, model: str, capsys):
    """evaluate writes one row per test image; `inatpipe predict` on the files themselves gives the same class and
    probability for each, since both read and resize images the same way."""
    evaluated = pd.read_csv(pipeline.root / f"metrics/evaluate/{model}/predictions.csv")
    assert list(evaluated.columns) == ["path", "label", "predicted", "probability"] and len(evaluated) == 12
    out = pipeline.root / f"predicted_{model}.csv"
    with inside(pipeline.root):
        main(["predict", "--model", f"models/{model}.pt", "data/val", "--batch-size", "16", "--csv", str(out)])
    capsys.readouterr()
    predicted = pd.read_csv(out).set_index("path")
    assert sorted(predicted.index) == sorted(evaluated["path"])
    for row in evaluated.itertuples():
        assert predicted.loc[row.path, "class_1"] == row.predicted, row.path
        # Batches of 16 here and of evaluate.batch_size there round differently; the temperature (below 1 for an
        # under-confident model) scales those differences up with the logits.
        assert predicted.loc[row.path, "probability_1"] == pytest.approx(row.probability, abs=1e-5), row.path


@pytest.mark.parametrize("model", MODELS)
def test_compare_agrees_with_the_evaluations_and_their_predictions(pipeline: Pipeline, model: str):
    compare = read_json(pipeline.root, "metrics/compare.json")[model]
    test = read_json(pipeline.root, f"metrics/evaluate/{model}/metrics.json")["test"]
    assert (compare["test_accuracy"], compare["macro_f1"], compare["ece"]) == (
        test["accuracy"],
        test["macro_f1"],
        test["ece"],
    )
    # And both follow from the per-image predictions, by scikit-learn.
    rows = pd.read_csv(pipeline.root / f"metrics/evaluate/{model}/predictions.csv")
    assert test["accuracy"] == pytest.approx(accuracy_score(rows["label"], rows["predicted"]))
    assert test["macro_f1"] == pytest.approx(f1_score(rows["label"], rows["predicted"], average="macro"))
    trained = read_json(pipeline.root, f"metrics/train_{model}/metrics.json")
    assert compare["params_trainable"] == trained["params_trainable"] and trained["processes"] == 1


@pytest.mark.parametrize("model", MODELS)
def test_evaluate_applies_the_temperature_training_stored(pipeline: Pipeline, model: str, capsys):
    """Each training stage fits a temperature on val and stores it in its checkpoint; evaluate reports the test
    ECE with it (calibrate: true by default) and without it, and `predict --no-calibrate` gives the plain softmax."""
    fitted = read_json(pipeline.root, f"metrics/train_{model}/metrics.json")["calibration"]
    _, meta = load_checkpoint(pipeline.root / f"models/{model}.pt")
    evaluated = read_json(pipeline.root, f"metrics/evaluate/{model}/metrics.json")
    assert meta["temperature"] == fitted["temperature"] == evaluated["temperature"] != 1.0
    assert set(fitted) == {"temperature", "val_ece", "val_ece_uncalibrated", "val_loss", "val_loss_uncalibrated"}
    assert fitted["val_loss"] <= fitted["val_loss_uncalibrated"]  # T minimises it, and T = 1 was a candidate
    test = evaluated["test"]
    assert {"ece", "ece_uncalibrated", "loss", "loss_uncalibrated"} <= set(test)
    out = pipeline.root / f"plain_{model}.csv"
    with inside(pipeline.root):
        main(["predict", "--model", f"models/{model}.pt", "data/val", "--no-calibrate", "--csv", str(out)])
    capsys.readouterr()
    plain = pd.read_csv(out).set_index("path")["probability_1"]
    calibrated = pd.read_csv(pipeline.root / f"metrics/evaluate/{model}/predictions.csv").set_index("path")
    changed = (plain[calibrated.index] - calibrated["probability"]).abs().max()
    assert changed > 1e-3, "the plain probabilities are the calibrated ones"


def test_resnet_trained_on_cached_features_of_the_given_weights(pipeline: Pipeline):
    trained = read_json(pipeline.root, "metrics/train_resnet/metrics.json")
    assert {k: trained[k] for k in ("arch", "strategy", "backbone_features", "pretrained", "params_trainable")} == {
        "arch": "resnet18",
        "strategy": "head",
        "backbone_features": "cached",
        "pretrained": True,
        "params_trainable": 512 * 3 + 3,
    }


def test_evaluate_and_compare_write_the_report_and_its_images(pipeline: Pipeline):
    root = pipeline.root
    for name in MODELS:
        with Image.open(root / "reports" / name / "prediction_grid.png") as grid:
            assert grid.format == "PNG"  # three classes: three rows of three
            assert grid.size == (round(GRID_COLUMNS * CELL_INCHES[0] * DPI), round(3 * CELL_INCHES[1] * DPI))
        table = (root / "reports" / name / "per_class.md").read_text()
        assert all(f"| {row}" in table for row in ("cat", "dog", "owl", "macro avg", "weighted avg"))
        # Grad-CAM: rows of the (up to 8) wrong predictions, then a row for each class's best right one.
        rows = pd.read_csv(root / f"metrics/evaluate/{name}/predictions.csv")
        mistakes = min(GRADCAM_MISTAKES, int((rows["label"] != rows["predicted"]).sum()))
        classes_right = rows.loc[rows["label"] == rows["predicted"], "label"].nunique()
        grid_rows = -(-mistakes // MISTAKE_COLUMNS) + max(1, -(-classes_right // MISTAKE_COLUMNS))
        with Image.open(root / "reports" / name / "gradcam.png") as gradcam:
            cell = round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI)
            assert gradcam.size == (MISTAKE_COLUMNS * cell[0], grid_rows * cell[1])
    report = (root / "reports" / "compare.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for expected in ("compare_bars.png", "flexible/prediction_grid.png", "resnet/confusion_matrix.png"):
        assert expected in images
    for image in images:
        with Image.open(root / "reports" / image) as img:
            img.verify()
    assert "| test accuracy" in report and "| trainable parameters" in report and "| cat" in report


def test_prediction_grid_shows_the_test_images_as_prepared(pipeline: Pipeline):
    """The grid's first cell is the first test image, read from the prepared arrays (not the raw files)."""
    with Image.open(pipeline.root / "reports/flexible/prediction_grid.png") as grid:
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    first = np.load(pipeline.root / "artifacts/prepared/test.npy")[0].astype(int)
    cell_w, cell_h = round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI)
    cell = pixels[:cell_h, :cell_w]
    # The thumbnail fills the middle of its cell: its mean colour is the image's, not the white page's.
    middle = cell[cell_h // 2 - 10 : cell_h // 2 + 10, cell_w // 2 - 10 : cell_w // 2 + 10].reshape(-1, 3).mean(0)
    assert np.abs(middle - first.reshape(-1, 3).mean(0)).max() < 40


TEMPORARY = re.compile(r"(^|/)\.[^/]+\.\d+\.tmp$")  # inatpipe.atomic's temporary files
# dvclive writes its own files in each Live folder: the summary, per-step metrics and the confusion-matrix data.
DVCLIVE = re.compile(r"^metrics/(train_[a-z]+|evaluate/[a-z]+)/(metrics\.json|plots/metrics/.+\.tsv|plots/sklearn/.+)$")


def test_every_file_the_stages_write_themselves_is_written_atomically(pipeline: Pipeline):
    """A file is only ever opened for writing as a temporary beside its target (then fsynced and renamed onto it);
    the one exception is what dvclive writes in its folders."""
    written = {stage: sorted(record.written) for stage, record in pipeline.records.items()}
    assert any(TEMPORARY.search(path) for paths in written.values() for path in paths)  # the recording works
    direct = {
        stage: [p for p in paths if not TEMPORARY.search(p) and not DVCLIVE.match(p) and not Path(p).is_dir()]
        for stage, paths in written.items()
    }
    assert direct == {stage: [] for stage in written}


def test_same_params_and_seed_give_the_same_metrics_and_weights(pipeline: Pipeline):
    def quality():
        metrics = read_json(pipeline.root, "metrics/train_flexible/metrics.json")
        metrics.pop("train_seconds")
        return metrics, torch.load(pipeline.root / "models/flexible.pt", weights_only=True)["state_dict"]

    before, weights = quality()
    stages.run(pipeline.root, "train_flexible")
    after, again = quality()
    assert after == before and all(torch.equal(again[k], v) for k, v in weights.items())


def test_predictions_csv_is_plain_csv(pipeline: Pipeline):
    with (pipeline.root / "metrics/evaluate/flexible/predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["path"].startswith("data/val/") and 0 < float(rows[0]["probability"]) <= 1


def test_resnet_checkpoint_is_the_complete_model_with_the_given_backbone(pipeline: Pipeline):
    model, meta = load_checkpoint(pipeline.root / "models/resnet.pt")
    assert meta["model_config"] == {"arch": "resnet18"}
    weights = torch.load(yaml.safe_load((pipeline.root / "params.yaml").read_text())["resnet"]["weights"])
    assert torch.equal(model.backbone.conv1.weight, weights["conv1.weight"])  # trained on features, saved whole


def test_with_augmentation_the_backbone_runs_every_epoch_instead(pipeline: Pipeline, tmp_path: Path, capsys):
    root = tmp_path / "project"
    shutil.copytree(pipeline.root, root)
    Project(root).set_params({"data": {"augment": True}})
    capsys.readouterr()
    stages.run(root, "features")
    stages.run(root, "train_resnet")
    out = capsys.readouterr().out
    assert "full forward pass every epoch: data.augment is on" in out
    assert read_json(root, "artifacts/features/skipped.json")["skipped"] is True
    assert read_json(root, "metrics/train_resnet/metrics.json")["backbone_features"] == "forward"
