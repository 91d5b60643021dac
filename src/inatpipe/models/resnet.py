"""Transfer learning: a torchvision ResNet backbone (ImageNet weights when available) and a new linear head."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

from inatpipe.errors import UserError


class TransferResNet(nn.Module):
    """ResNet backbone with its ImageNet classifier removed, and a head sized for this dataset's classes.

    With `freeze_backbone`, only the head trains, and the backbone stays in eval mode even in `train()`:
    frozen BatchNorm layers must keep the running statistics they were pretrained with.
    """

    def __init__(self, num_classes: int, arch: str = "resnet50", freeze_backbone: bool = True):
        super().__init__()
        self.freeze_backbone = freeze_backbone
        self.backbone = torchvision.models.get_model(arch, weights=None)
        in_features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(in_features, num_classes)
        self.backbone.requires_grad_(not freeze_backbone)

    def train(self, mode: bool = True) -> TransferResNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def imagenet_weights(arch: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(arch).DEFAULT


def load_backbone_state(model: TransferResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision ResNet state_dict into the backbone; its ImageNet `fc` layer is dropped."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(
            f"{source} does not match the backbone ({what}; {len(missing)} missing, {len(unexpected)} extra keys); "
            "give a state_dict saved from the same torchvision architecture"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"resnet.weights: {path} not found; give imagenet, none or the path of a saved state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a file that is not a checkpoint
        raise UserError(
            f"resnet.weights: {path} is not a readable torch state_dict ({type(e).__name__}: {e})"
        ) from None


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
            "  then retrain: dvc repro --force --single-item train_resnet && dvc repro\n"
            f"Set resnet.require_pretrained: true to stop here instead.\n{'!' * 78}\n",
            file=sys.stderr,
        )
        return False
    load_backbone_state(model, state, f"ImageNet weights {enum}")
    return True
