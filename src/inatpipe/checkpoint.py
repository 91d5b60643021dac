"""Checkpoints that carry everything needed to rebuild and use their model: architecture, classes, normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from inatpipe.atomic import atomic_open
from inatpipe.errors import UserError
from inatpipe.models import build_model

FORMAT_VERSION = 1


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    model_name: str,
    model_config: dict,
    classes: list[str],
    image_size: int,
    mean: list[float],
    std: list[float],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write atomically (temp file, fsync, rename), so an interrupted run never leaves a truncated checkpoint."""
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_config": model_config,
        "classes": list(classes),
        "image_size": image_size,
        "normalization": {"mean": list(mean), "std": list(std)},
        "extra": extra or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its saved config and weights; returns (model in eval mode, checkpoint metadata)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; run `dvc repro` to train it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file raises one of several unrelated types
        raise UserError(
            f"{path} is not a readable inatpipe checkpoint ({type(e).__name__}); retrain with `dvc repro`"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not an inatpipe checkpoint of format {FORMAT_VERSION}; retrain with `dvc repro`")
    model = build_model(ckpt["model_name"], len(ckpt["classes"]), ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
