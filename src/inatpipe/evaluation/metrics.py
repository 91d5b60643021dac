"""Test-set evaluation: predictions, forward-pass timing, classification metrics from scikit-learn, calibration."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from inatpipe.checkpoint import load_checkpoint
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.training.precision import autocast


@dataclass(frozen=True)
class Predictions:
    targets: np.ndarray  # (n,) class indices
    logits: torch.Tensor  # (n, num_classes), float64
    forward_seconds: float  # model time only: no decoding, no transfer of results

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()

    @property
    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class."""
        return self.logits.softmax(1).max(1).values.numpy()


# Equal-width confidence bins, the usual choice since Guo et al. (2017); with few test images many bins stay empty,
# and empty bins weigh nothing in the error.
CALIBRATION_BINS = 15


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, num_bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width bin (lower, upper]: how many predictions fell in it, their accuracy and mean confidence."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of exactly 0 joins the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    bins = []
    for i in range(num_bins):
        members = which == i
        count = int(members.sum())
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "accuracy": float(correct[members].mean()) if count else 0.0,
                "confidence": float(confidence[members].mean()) if count else 0.0,
            }
        )
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, num_bins: int = CALIBRATION_BINS) -> float:
    """Sum over bins of (share of predictions in the bin) x |accuracy - mean confidence| in the bin."""
    total = len(confidence)
    bins = reliability_bins(confidence, correct, num_bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)) if total else 0.0


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the timer measures computation rather than kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32") -> Predictions:
    model.eval()
    targets, outputs, seconds, warmed_up = [], [], 0.0, False
    for x, y in tqdm(loader, desc="predict", unit="batch", disable=None, leave=False):
        x = x.to(device, non_blocking=True)
        if not warmed_up:  # the first call pays one-off kernel set-up; keep it out of the throughput figure
            with autocast(device, precision):
                model(x)
            warmed_up = True
        _sync(device)
        start = time.perf_counter()
        with autocast(device, precision):
            logits = model(x)
        _sync(device)
        seconds += time.perf_counter() - start
        outputs.append(logits.detach().double().cpu())
        targets.append(y)
    return Predictions(torch.cat(targets).numpy(), torch.cat(outputs), seconds)


def _averages(y: np.ndarray, y_hat: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Macro and weighted averages over every class, as scikit-learn's classification_report gives them."""
    out = {}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, y_hat, labels=labels, average=average, zero_division=0
        )
        out[f"{average} avg"] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": len(y),
        }
    return out


def classification_metrics(pred: Predictions, classes: list[str]) -> dict:
    """Loss, accuracy, macro-F1, ECE, per-class precision/recall/F1/support with their macro and weighted averages,
    the reliability bins, and the confusion matrix as nested lists."""
    labels = np.arange(len(classes))
    y, y_hat = pred.targets, pred.predicted
    precision, recall, f1, support = precision_recall_fscore_support(y, y_hat, labels=labels, zero_division=0)
    confidence, correct = pred.confidence, y_hat == y
    return {
        "loss": torch.nn.functional.cross_entropy(pred.logits, torch.from_numpy(y)).item(),
        "accuracy": float(accuracy_score(y, y_hat)),
        # Averaged over the classes that occur in the targets or predictions, as scikit-learn does by default:
        # a class with no test images would otherwise count as F1 = 0.
        "macro_f1": float(f1_score(y, y_hat, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "averages": _averages(y, y_hat, labels),
        "ece": expected_calibration_error(confidence, correct),
        "reliability": reliability_bins(confidence, correct),
        "confusion_matrix": confusion_matrix(y, y_hat, labels=labels).tolist(),
    }


def evaluate_checkpoint(
    checkpoint: Path,
    prepared: Path,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[dict, Predictions, list[str]]:
    """Rebuild a model from its checkpoint (classes, size and normalisation travel inside) and score it on the test
    subset of the prepared images in `prepared`."""
    model, meta = load_checkpoint(checkpoint, device)
    classes = meta["classes"]
    size, norm = meta["image_size"], meta["normalization"]
    if read_meta(prepared)["classes"] != classes:
        raise UserError(f"{checkpoint} was trained on other classes than {prepared} holds; rerun `dvc repro`")
    dataset = PreparedDataset(prepared, "test", BatchResize(size))
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device)
    pred = predict(model, NormalizedLoader(loader, norm["mean"], norm["std"], device), device, precision)
    metrics = classification_metrics(pred, classes)
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
