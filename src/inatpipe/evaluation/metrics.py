"""Test-set evaluation: predictions (with test-time augmentation and the checkpoint's temperature), forward-pass
timing, classification metrics (scikit-learn's definitions, from the confusion matrix), calibration before and after
the temperature."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from inatpipe.checkpoint import load_checkpoint, temperature_of
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.evaluation.tta import view_logits
from inatpipe.training.calibration import calibrated_logits, expected_calibration_error, reliability_bins
from inatpipe.training.precision import autocast


@dataclass(frozen=True)
class Predictions:
    targets: np.ndarray  # (n,) class indices
    # (n, num_classes), float64: scores whose softmax is the reported probabilities: the model's logits, divided by
    # the temperature when calibrated, and with test-time augmentation the log of the views' mean probabilities
    logits: torch.Tensor
    forward_seconds: float  # model time only: no decoding, no transfer of results

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()

    @property
    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class."""
        return self.logits.softmax(1).max(1).values.numpy()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the timer measures computation rather than kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class ViewLogits:
    """A model's raw logits on the test images, one tensor per test-time view, before any temperature."""

    targets: np.ndarray  # (n,) class indices
    views: list[torch.Tensor]  # each (n, num_classes), float64
    forward_seconds: float

    def predictions(self, temperature: float = 1.0) -> Predictions:
        """The probabilities of softmax(logits / temperature), averaged over the views."""
        return Predictions(self.targets, calibrated_logits(self.views, temperature), self.forward_seconds)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32", tta: str = "none"
) -> ViewLogits:
    model.eval()
    targets, outputs, seconds, warmed_up = [], [], 0.0, False
    for x, y in tqdm(loader, desc="predict", unit="batch", disable=None, leave=False):
        x = x.to(device, non_blocking=True)
        if not warmed_up:  # the first call pays one-off kernel set-up; keep it out of the throughput figure
            with autocast(device, precision):
                view_logits(model, x, tta)
            warmed_up = True
        _sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            views = view_logits(model, x, tta)
        _sync(device)
        seconds += time.perf_counter() - start
        outputs.append([v.detach().double().cpu() for v in views])
        targets.append(y)
    views = [torch.cat(view) for view in zip(*outputs, strict=True)]
    return ViewLogits(torch.cat(targets).numpy(), views, seconds)


def confusion(y: np.ndarray, y_hat: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): row i, column j = images of class i predicted as j."""
    return np.bincount(y * num_classes + y_hat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (scikit-learn's zero_division=0)."""
    return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)


# Precision, recall and F1 are computed here from the confusion matrix, as scikit-learn defines them (tests check
# them against its classification_report): importing sklearn.metrics costs every evaluate process 1.5-2 s of start-up
# on two CPU cores (it loads SciPy), more than the scores of a small test set take.
def _scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1, support (test images) and predicted (predictions) from a confusion matrix."""
    hits, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    return {
        "precision": _ratio(hits, predicted),
        "recall": _ratio(hits, support),
        "f1": _ratio(2 * hits, support + predicted),  # 2PR / (P + R), without dividing by zero on the way
        "support": support,
        "predicted": predicted,
    }


def _averages(scores: dict[str, np.ndarray]) -> dict[str, dict]:
    """Macro and weighted averages over every class, as scikit-learn's classification_report gives them."""
    support = scores["support"]
    weights = {"macro": None, "weighted": support if support.sum() else None}
    return {
        f"{average} avg": {
            **{k: float(np.average(scores[k], weights=w)) for k in ("precision", "recall", "f1")},
            "support": int(support.sum()),
        }
        for average, w in weights.items()
    }


def _loss(pred: Predictions) -> float:
    """Mean negative log-likelihood of the targets under the reported probabilities."""
    return torch.nn.functional.cross_entropy(pred.logits, torch.from_numpy(pred.targets)).item()


def classification_metrics(pred: Predictions, classes: list[str]) -> dict:
    """Loss, accuracy, macro-F1, ECE, per-class precision/recall/F1/support with their macro and weighted averages,
    the reliability bins, and the confusion matrix as nested lists."""
    y, y_hat = pred.targets, pred.predicted
    cm = confusion(y, y_hat, len(classes))
    scores = _scores(cm)
    occurring = scores["support"] + scores["predicted"] > 0
    confidence, correct = pred.confidence, y_hat == y
    return {
        "loss": _loss(pred),
        "accuracy": float(np.trace(cm) / max(1, len(y))),
        # Averaged over the classes that occur in the targets or predictions, as scikit-learn does by default:
        # a class with no test images would otherwise count as F1 = 0.
        "macro_f1": float(scores["f1"][occurring].mean()),
        "per_class": {
            name: {
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(scores["support"][i]),
            }
            for i, name in enumerate(classes)
        },
        "averages": _averages(scores),
        "ece": expected_calibration_error(confidence, correct),
        "reliability": reliability_bins(confidence, correct),
        "confusion_matrix": cm.tolist(),
    }


def evaluate_checkpoint(
    checkpoint: Path, prepared: Path, batch_size: int, device: torch.device, *args, **kwargs
) -> tuple[dict, Predictions, list[str]]:
    """`evaluate_model` (the rest of its arguments as there) on the model a checkpoint rebuilds: classes, image size
    and normalisation travel inside it."""
    return evaluate_model(*load_checkpoint(checkpoint, device), prepared, batch_size, device, *args, **kwargs)


def evaluate_model(
    model: nn.Module,
    meta: dict,
    prepared: Path,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
    *,
    tta: str = "none",
    calibrate: bool = True,
) -> tuple[dict, Predictions, list[str]]:
    """Score a loaded checkpoint's model (`meta`: the rest of the checkpoint) on the test subset of the prepared
    images in `prepared`: on each image and, with `tta`, its views; with `calibrate`, at the checkpoint's temperature.
    The metrics and predictions are of those probabilities; `ece_uncalibrated` and `loss_uncalibrated` give the same
    views without the temperature, and `temperature` the checkpoint's."""
    classes = meta["classes"]
    size, norm = meta["image_size"], meta["normalization"]
    if read_meta(prepared)["classes"] != classes:
        raise UserError(f"the checkpoint was trained on other classes than {prepared} holds; rerun `dvc repro`")
    dataset = PreparedDataset(prepared, "test", BatchResize(size))
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device)
    views = predict(model, NormalizedLoader(loader, norm["mean"], norm["std"], device), device, precision, tta)
    temperature = temperature_of(meta)
    pred = views.predictions(temperature if calibrate else 1.0)
    metrics = classification_metrics(pred, classes)
    plain = views.predictions(1.0)
    metrics["ece_uncalibrated"] = expected_calibration_error(plain.confidence, plain.predicted == plain.targets)
    metrics["loss_uncalibrated"] = _loss(plain)
    metrics["temperature"] = temperature
    metrics["infer_images_per_second"] = len(dataset) / max(pred.forward_seconds, 1e-9)
    return metrics, pred, classes


def predictions_table(pred: Predictions, classes: list[str], paths: list[str]) -> pd.DataFrame:
    """One row per test image, in index order: its path, true class, predicted class and that class's probability."""
    return pd.DataFrame(
        {
            "path": paths,
            "label": [classes[i] for i in pred.targets],
            "predicted": [classes[i] for i in pred.predicted],
            "probability": pred.confidence.round(6),
        }
    )
