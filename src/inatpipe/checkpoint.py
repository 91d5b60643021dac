"""Checkpoints that carry everything needed to rebuild and use their model: architecture, classes, normalisation,
and the temperature that calibrates its probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inatpipe import torchfile
from inatpipe.errors import UserError
from inatpipe.models import build_model

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, besides its weights: the registry name and config that rebuild it, the classes its outputs
    stand for, and the input it expects (image size and normalisation)."""

    name: str
    config: dict[str, Any]
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]

    def build(self) -> nn.Module:
        return build_model(self.name, len(self.classes), self.config)


def save_checkpoint(
    path: Path,
    spec: ModelSpec,
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    temperature: float = 1.0,
) -> None:
    """Write atomically (temp file, fsync, rename), so an interrupted run never leaves a truncated checkpoint.
    `temperature`: the T that calibrates the model's probabilities, softmax(logits / T), fitted on the validation
    subset at the end of training (1.0: none, or not fitted yet)."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": spec.name,
        "model_config": spec.config,
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "extra": extra or {},
        "temperature": float(temperature),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    torchfile.save(payload, path)


def spec_of(meta: dict[str, Any]) -> ModelSpec:
    """The ModelSpec a checkpoint's metadata (as `load_checkpoint` returns it) records."""
    norm = meta["normalization"]
    return ModelSpec(
        meta["model_name"], meta["model_config"], meta["classes"], meta["image_size"], norm["mean"], norm["std"]
    )


def temperature_of(meta: dict[str, Any]) -> float:
    """The calibrating temperature a checkpoint's metadata records; 1.0 (no change) for a checkpoint written before
    temperatures were stored."""
    return float(meta.get("temperature", 1.0))


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its saved config and weights; returns (model in eval mode, checkpoint metadata)."""
    ckpt = torchfile.load(path, what="checkpoint", fix="run `dvc repro` to train it")
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not an inatpipe checkpoint of format {FORMAT_VERSION}; retrain with `dvc repro`")
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    model = spec_of(meta).build()
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), meta
