"""Model registry: every model family under one name, built from a plain config dict (as saved in checkpoints)."""

from __future__ import annotations

from torch import nn

from inatpipe.errors import UserError
from inatpipe.models.flexible_cnn import FlexibleCNN
from inatpipe.models.resnet import TransferResNet

MODELS: dict[str, type[nn.Module]] = {"flexible_cnn": FlexibleCNN, "resnet": TransferResNet}


def build_model(name: str, num_classes: int, config: dict) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, **config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
