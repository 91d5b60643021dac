"""Transfer learning: a torchvision ResNet backbone (ImageNet weights when available) and a new linear head."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from inatpipe import torchfile
from inatpipe.errors import UserError
from inatpipe.params import RESNET_ARCHS as ARCHS

if TYPE_CHECKING:
    import torchvision

# The backbone's stages from the input up; fine-tuning unfreezes them from the top (layer4) down.
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class TransferResNet(nn.Module):
    """ResNet backbone with its ImageNet classifier removed, and a head sized for this dataset's classes.

    The head always trains; of the backbone, only the last `trainable_stages` of STAGES do (0: none, the default;
    5: every layer). Frozen stages stay in eval mode even in `train()`: their BatchNorm layers must keep the
    running statistics they were pretrained with.
    """

    def __init__(self, num_classes: int, arch: str = "resnet50", freeze_backbone: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown ResNet architecture {arch!r}; known: {', '.join(ARCHS)}")
        self.backbone = _torchvision().models.get_model(arch, weights=None)
        in_features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(in_features, num_classes)
        self.set_trainable_stages(0 if freeze_backbone else len(STAGES))

    def stage_modules(self, stage: str) -> list[nn.Module]:
        b = self.backbone
        return [b.conv1, b.bn1] if stage == "stem" else [getattr(b, stage)]

    def set_trainable_stages(self, count: int) -> None:
        """Train the last `count` backbone stages (and the head); freeze the rest, in eval mode from now on."""
        if not 0 <= count <= len(STAGES):
            raise ValueError(f"trainable stages must be in 0..{len(STAGES)}, got {count}")
        self.trainable_stages = count
        for i, stage in enumerate(STAGES):
            for module in self.stage_modules(stage):
                module.requires_grad_(i >= len(STAGES) - count)
        self.train(self.training)

    @property
    def frozen_stages(self) -> tuple[str, ...]:
        return STAGES[: len(STAGES) - self.trainable_stages]

    @property
    def freeze_backbone(self) -> bool:
        return self.trainable_stages == 0

    def train(self, mode: bool = True) -> TransferResNet:
        super().train(mode)
        if self.trainable_stages == 0:
            self.backbone.eval()
        for stage in self.frozen_stages:
            for module in self.stage_modules(stage):
                module.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _torchvision():
    """torchvision, imported when a ResNet is first built: it takes seconds to import (its ops load torch's
    compiler), which every stage that never builds one would otherwise pay."""
    import torchvision

    return torchvision


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    return _torchvision().models.get_model_weights(arch).DEFAULT


def load_backbone_state(model: TransferResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision ResNet state_dict into the backbone; its ImageNet `fc` layer is dropped."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same key names, other shapes: e.g. resnet50 weights into wide_resnet50_2
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(
            f"{source} does not match the backbone ({first.rstrip('.')}); "
            "give a state_dict saved from the same torchvision architecture"
        ) from None
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(
            f"{source} does not match the backbone ({what}; {len(missing)} missing, {len(unexpected)} extra keys); "
            "give a state_dict saved from the same torchvision architecture"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torchfile.load(
        path, what="torch state_dict", fix="set resnet.weights to imagenet, none or the path of a saved state_dict"
    )


def load_pretrained(model: TransferResNet, weights: str, arch: str, require: bool) -> bool:
    """Fill the backbone from `weights` (imagenet | none | path); returns whether pretrained weights were loaded.

    When ImageNet weights can't be had (typically: no network), training still runs from random initialisation
    after a prominent warning, unless `require` asks for an error instead.
    """
    if weights == "none":
        return False
    if weights != "imagenet":
        load_backbone_state(model, read_state_dict(Path(weights)), f"resnet.weights: {weights}")
        return True
    enum = imagenet_weights(arch)
    try:
        state = enum.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a corrupt download fails the hash check
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        if require:
            raise UserError(
                f"ImageNet weights for {arch} could not be loaded ({e}); put {enum.url} at {cache} "
                "or set resnet.weights to a state_dict path"
            ) from None
        print(
            f"\n{'!' * 78}\nWARNING: ImageNet weights for {arch} could not be loaded ({e}).\n"
            "The backbone starts from RANDOM weights, so expect poor accuracy; metrics record pretrained: false.\n"
            f"To use real weights: download {enum.url}\n"
            f"  to {cache} (torchvision's cache), or set resnet.weights: path/to/state_dict.pth,\n"
            "  then retrain: dvc repro --force --single-item features train_resnet && dvc repro\n"
            f"Set resnet.require_pretrained: true to stop here instead.\n{'!' * 78}\n",
            file=sys.stderr,
        )
        return False
    load_backbone_state(model, state, f"ImageNet weights {enum}")
    return True
