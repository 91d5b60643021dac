"""What the training stages share: loaders from the split and stats files, and a tracked run of `fit`.

`train_and_track` wires the dvclive-free loop in `training.py` to dvclive, keeps the best-on-val checkpoint,
and returns the run's summary metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dvclive import Live
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from inatpipe.checkpoint import save_checkpoint
from inatpipe.data.dataset import IndexDataset, make_loader
from inatpipe.data.index import read_classes, read_index
from inatpipe.data.stats import read_stats
from inatpipe.data.transforms import eval_transform, train_transform
from inatpipe.models import count_parameters
from inatpipe.params import DataParams
from inatpipe.paths import SPLIT_DIR, STATS_FILE
from inatpipe.training import fit


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    train: DataLoader
    val: DataLoader


def training_data(data: DataParams, batch_size: int, generator: torch.Generator, device: torch.device) -> TrainingData:
    """Loaders over the train and val index files, normalised with the train-subset statistics."""
    classes = read_classes(SPLIT_DIR / "classes.json")
    stats = read_stats(STATS_FILE, data.image_size)
    mean, std = stats["mean"], stats["std"]
    plain = eval_transform(data.image_size, mean, std)
    augmented = train_transform(
        data.image_size, mean, std, hflip=data.hflip, rotation=data.rotation, crop_scale=data.crop_scale
    )
    train_set = IndexDataset(read_index(SPLIT_DIR / "train.csv"), classes, augmented if data.augment else plain)
    val_set = IndexDataset(read_index(SPLIT_DIR / "val.csv"), classes, plain)
    loader_args = {"num_workers": data.num_workers, "generator": generator, "device": device}
    return TrainingData(
        classes=classes,
        image_size=data.image_size,
        mean=mean,
        std=std,
        train=make_loader(train_set, batch_size, shuffle=True, **loader_args),
        val=make_loader(val_set, batch_size, **loader_args),
    )


def train_and_track(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    *,
    epochs: int,
    device: torch.device,
    live_dir: Path,
    checkpoint: Path,
    model_name: str,
    model_config: dict,
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `fit`, log each epoch to dvclive (step = epoch), save the best-on-val checkpoint; return the summary."""
    total, trainable = count_parameters(model)
    best_acc, best_loss, best_epoch = -1.0, float("inf"), 0
    start = time.perf_counter()
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        for m in fit(model, optimizer, data.train, data.val, epochs, device):
            live.step = m.epoch
            live.log_metric("train/loss", m.train_loss)
            live.log_metric("train/accuracy", m.train_accuracy)
            live.log_metric("val/loss", m.val_loss)
            live.log_metric("val/accuracy", m.val_accuracy)
            improved = m.val_accuracy > best_acc or (m.val_accuracy == best_acc and m.val_loss < best_loss)
            if improved:
                best_acc, best_loss, best_epoch = m.val_accuracy, m.val_loss, m.epoch
                save_checkpoint(
                    checkpoint,
                    model,
                    model_name=model_name,
                    model_config=model_config,
                    classes=data.classes,
                    image_size=data.image_size,
                    mean=data.mean,
                    std=data.std,
                    extra={"epoch": m.epoch, "val_accuracy": m.val_accuracy, "params_trainable": trainable},
                )
            tqdm.write(
                f"epoch {m.epoch}/{epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:.4f}  "
                f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.4f}  {m.seconds:.1f}s{'  *best' if improved else ''}"
            )
        live.summary.update(
            {
                "best": {"epoch": best_epoch, "val_accuracy": best_acc, "val_loss": best_loss},
                "train_seconds": round(time.perf_counter() - start, 2),
                "params_total": total,
                "params_trainable": trainable,
                **(summary or {}),
            }
        )
        live.make_summary()
        return dict(live.summary)
