"""Test-set evaluation: predictions, timing of the forward pass, and classification metrics from scikit-learn."""

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
from inatpipe.data.dataset import IndexDataset, make_loader
from inatpipe.data.transforms import eval_transform


@dataclass(frozen=True)
class Predictions:
    targets: np.ndarray  # (n,) class indices
    logits: torch.Tensor  # (n, num_classes), float64
    forward_seconds: float  # model time only: no decoding, no transfer of results

    @property
    def predicted(self) -> np.ndarray:
        return self.logits.argmax(1).numpy()


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the timer measures computation rather than kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> Predictions:
    model.eval()
    targets, outputs, seconds, warmed_up = [], [], 0.0, False
    for x, y in tqdm(loader, desc="predict", unit="batch", disable=None, leave=False):
        x = x.to(device)
        if not warmed_up:  # the first call pays one-off kernel set-up; keep it out of the throughput figure
            model(x)
            warmed_up = True
        _sync(device)
        start = time.perf_counter()
        logits = model(x)
        _sync(device)
        seconds += time.perf_counter() - start
        outputs.append(logits.detach().double().cpu())
        targets.append(y)
    return Predictions(torch.cat(targets).numpy(), torch.cat(outputs), seconds)


def classification_metrics(pred: Predictions, classes: list[str]) -> dict:
    """Loss, accuracy, macro-F1 and per-class precision/recall/F1/support; the confusion matrix as nested lists."""
    labels = np.arange(len(classes))
    y, y_hat = pred.targets, pred.predicted
    precision, recall, f1, support = precision_recall_fscore_support(y, y_hat, labels=labels, zero_division=0)
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
        "confusion_matrix": confusion_matrix(y, y_hat, labels=labels).tolist(),
    }


def evaluate_checkpoint(
    checkpoint: Path, test_index: pd.DataFrame, batch_size: int, num_workers: int, device: torch.device
) -> tuple[dict, Predictions, list[str]]:
    """Rebuild a model from its checkpoint (classes, size and normalisation travel inside); score it on `test_index`."""
    model, meta = load_checkpoint(checkpoint, device)
    classes = meta["classes"]
    norm = meta["normalization"]
    dataset = IndexDataset(test_index, classes, eval_transform(meta["image_size"], norm["mean"], norm["std"]))
    pred = predict(model, make_loader(dataset, batch_size, num_workers=num_workers, device=device), device)
    metrics = classification_metrics(pred, classes)
    metrics["infer_images_per_second"] = len(dataset) / max(pred.forward_seconds, 1e-9)
    return metrics, pred, classes
