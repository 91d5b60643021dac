"""Calibration, per-class tables and the report images: hand-computed numbers, scikit-learn, real PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from inatpipe.data.index import scan_folder
from inatpipe.evaluation.compare import report_markdown, strategy_text, weights_source
from inatpipe.evaluation.figures import (
    CELL_INCHES,
    DPI,
    GRID_COLUMNS,
    MISTAKE_COLUMNS,
    comparison_bars,
    per_class_markdown,
    write_model_report,
)
from inatpipe.evaluation.metrics import (
    Predictions,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)

from .conftest import write_image_folder


def test_ece_of_a_hand_computed_example():
    confidence = np.array([0.9, 0.95, 0.7, 0.65, 0.3])
    correct = np.array([True, False, True, True, False])
    # Five bins of width 0.2:  (0.8, 1]: acc 1/2, conf 0.925 -> 2/5 x 0.425 = 0.17
    #                          (0.6, 0.8]: acc 1, conf 0.675 -> 2/5 x 0.325 = 0.13
    #                          (0.2, 0.4]: acc 0, conf 0.3   -> 1/5 x 0.3   = 0.06
    assert expected_calibration_error(confidence, correct, num_bins=5) == pytest.approx(0.36)
    counts = [b["count"] for b in reliability_bins(confidence, correct, num_bins=5)]
    assert counts == [0, 1, 0, 2, 2]
    # A confidence on a bin edge belongs to the bin below it: (0.6, 0.8].
    assert [b["count"] for b in reliability_bins(np.array([0.8]), np.array([True]), num_bins=5)] == [0, 0, 0, 1, 0]


def test_ece_from_logits_in_the_metrics():
    # Softmax confidences 0.9 (right), 0.9 (wrong), 0.6 (right), in 15 bins:
    # (0.867, 0.933]: acc 1/2, conf 0.9 -> 2/3 x 0.4;  (0.6, 0.667]... 0.6 sits on an edge: (0.533, 0.6]: acc 1,
    # conf 0.6 -> 1/3 x 0.4.  ECE = 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]], dtype=torch.float64)
    m = classification_metrics(Predictions(np.array([0, 1, 1]), probs.log(), 1.0), ["a", "b"])
    assert m["ece"] == pytest.approx(0.4)
    assert sum(b["count"] for b in m["reliability"]) == 3
    perfect = torch.tensor([[20.0, -20.0], [-20.0, 20.0]], dtype=torch.float64)
    assert classification_metrics(Predictions(np.array([0, 1]), perfect, 1.0), ["a", "b"])["ece"] < 1e-6


def test_per_class_metrics_agree_with_sklearn_classification_report():
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "cat", "dog", "eel", "fox"]  # "fox": no test image, never predicted
    targets = rng.integers(0, 5, size=200)
    predicted = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 4, size=200))  # "eel" is never predicted
    logits = torch.full((200, 6), -3.0, dtype=torch.float64)
    logits[torch.arange(200), torch.from_numpy(predicted)] = 3.0
    m = classification_metrics(Predictions(targets, logits, 1.0), classes)

    assert m["accuracy"] == pytest.approx(accuracy_score(targets, predicted))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro", zero_division=0))
    assert m["confusion_matrix"] == confusion_matrix(targets, predicted, labels=range(6)).tolist()
    report = classification_report(
        targets, predicted, labels=range(6), target_names=classes, output_dict=True, zero_division=0
    )
    for name in classes:
        expected = report[name]
        assert m["per_class"][name] == pytest.approx(
            {
                "precision": expected["precision"],
                "recall": expected["recall"],
                "f1": expected["f1-score"],
                "support": expected["support"],
            }
        )
    for average in ("macro avg", "weighted avg"):
        expected = report[average]
        assert m["averages"][average] == pytest.approx(
            {
                "precision": expected["precision"],
                "recall": expected["recall"],
                "f1": expected["f1-score"],
                "support": expected["support"],
            }
        )
    table = per_class_markdown(m["per_class"], m["averages"])
    assert table.count("\n") == 2 + 6 + 2  # header, rule, six classes, two averages
    macro_row = next(line for line in table.splitlines() if line.startswith("| macro avg"))
    assert [cell.strip() for cell in macro_row.strip("|").split("|")][1:] == [
        f"{report['macro avg'][k]:.4f}" for k in ("precision", "recall", "f1-score")
    ] + ["200"]


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
        return img.size


def test_model_report_images_have_one_row_per_class(tmp_path: Path):
    classes = ("ant", "bee", "cat", "dog", "eel")
    index = scan_folder(write_image_folder(tmp_path / "test", classes=classes, per_class=4))
    index = index.drop(index.index[index["label"] == "eel"][2:])  # eel: two images, one blank cell in its row
    targets = np.array([classes.index(label) for label in index["label"]])
    predicted = targets.copy()
    predicted[[0, 5, 9]] = (targets[[0, 5, 9]] + 1) % 5  # three mistakes
    logits = torch.full((len(targets), 5), 0.0, dtype=torch.float64)
    logits[torch.arange(len(targets)), torch.from_numpy(predicted)] = torch.linspace(1, 4, len(targets)).double()
    pred = Predictions(targets, logits, 1.0)
    m = classification_metrics(pred, list(classes))

    out = tmp_path / "reports" / "m"
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in index["path"]])
    written = write_model_report(out, "m", m, images, targets, pred.predicted, pred.confidence, list(classes))
    assert {p.name for p in written} == {
        "prediction_grid.png",
        "confident_mistakes.png",
        "reliability.png",
        "confusion_matrix.png",
        "per_class.md",
    }
    cell = (round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI))
    assert _png_size(out / "prediction_grid.png") == (GRID_COLUMNS * cell[0], len(classes) * cell[1])
    assert _png_size(out / "confident_mistakes.png") == (MISTAKE_COLUMNS * cell[0], 1 * cell[1])  # 3 mistakes: 1 row
    for name in ("reliability.png", "confusion_matrix.png"):
        width, height = _png_size(out / name)
        assert width > 300 and height > 300
    assert "weighted avg" in (out / "per_class.md").read_text()
    assert not math.isnan(m["ece"])


def test_compare_report_shows_models_side_by_side(tmp_path: Path):
    rows = {
        name: {
            "arch": arch,
            "strategy": strategy_text(trained),
            "test_accuracy": acc,
            "macro_f1": acc - 0.01,
            "ece": 0.05,
            "params_total": total,
            "params_trainable": trainable,
            "train_seconds": 12.3,
            "infer_images_per_second": 456.0,
            "pretrained": pretrained,
            "weights": weights_source(setting, pretrained),
        }
        for name, arch, trained, acc, total, trainable, pretrained, setting in (
            ("flexible", "flexible", {}, 0.9, 1000, 1000, False, None),
            (
                "resnet",
                "resnet50",
                {"strategy": "partial", "unfrozen": "layer4, layer3"},
                0.8,
                5000,
                30,
                False,
                "imagenet",
            ),
        )
    }
    assert (
        rows["resnet"]["strategy"] == "partial (head, layer4, layer3)"
        and rows["flexible"]["strategy"] == "from scratch"
    )
    assert strategy_text({"strategy": "staged", "unfrozen": "layer4"}) == "staged (head, then head, layer4)"
    assert strategy_text({"strategy": "head", "unfrozen": "none"}) == "head (backbone frozen)"
    assert rows["resnet"]["weights"] == "imagenet (NOT loaded: random init)"
    assert weights_source("w.pth", True) == "w.pth (loaded)"
    report = report_markdown(rows, {"flexible": "| table f |\n", "resnet": "| table r |\n"}, "bars.png")
    assert "| test accuracy" in report and "| 0.9000" in report and "| 5,000" in report
    strategy_row = next(line for line in report.splitlines() if line.startswith("| training (layers that train)"))
    assert "| from scratch" in strategy_row and "| partial (head, layer4, layer3)" in strategy_row
    assert "Best test accuracy: **flexible**" in report and "| table r |" in report
    assert "(flexible/prediction_grid.png)" in report and "(resnet/confusion_matrix.png)" in report
    with Image.open(comparison_bars(rows, tmp_path / "bars.png")) as img:
        assert img.format == "PNG" and img.size == (900, 400)
