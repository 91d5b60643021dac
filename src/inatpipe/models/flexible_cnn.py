"""FlexibleCNN: a configurable stack of conv blocks and one dense layer, trained from scratch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """`convs` (conv -> [BN] -> act, ..., conv -> [BN]) plus a shortcut of the input, then the activation: ResNet's
    placement, the sum before the block's last activation. The shortcut is the identity when the width is
    unchanged, else a 1x1 conv (+ BN) that projects the input to the new width."""

    def __init__(self, convs: nn.Sequential, shortcut: nn.Module, act: nn.Module):
        super().__init__()
        self.convs, self.shortcut, self.act = convs, shortcut, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + self.shortcut(x))


class FlexibleCNN(nn.Module):
    """Per `num_filters` entry a block: `convs_per_block` times conv -> [batch norm] -> activation, then pool; then
    dense -> act -> dropout -> logits. The report's network has one conv per block; two (as VGG stacks them) see as
    far as one conv of a larger kernel, with a nonlinearity between and fewer weights. With `residual`, each block's
    input is added to its convolutions' output before the last activation (ResidualBlock), and the pool follows.

    The output is logits: cross-entropy applies the softmax, so a softmax layer here would be applied twice.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        num_filters: Sequence[int] = (32, 64, 128, 256, 512),
        kernel_size: int = 3,
        activation: str = "ReLU",
        batch_norm: bool = True,
        dropout: float = 0.2,
        pooling: str = "max",
        pooling_kernel_size: int = 2,
        pooling_stride: int = 2,
        dense_neurons: int = 512,
        convs_per_block: int = 1,
        in_channels: int = 3,
        residual: bool = False,  # checkpoints from before the key build as they were: without shortcuts
    ):
        super().__init__()
        act = getattr(nn, activation)  # params validation restricts the name to no-argument torch.nn activations
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pooling]
        blocks = []
        channels = in_channels
        for width in num_filters:
            layers = []
            for i in range(convs_per_block):
                layers += [
                    # padding k//2 keeps the spatial size for any odd kernel; BN's shift makes a conv bias redundant.
                    nn.Conv2d(
                        channels if i == 0 else width, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm
                    ),
                    nn.BatchNorm2d(width) if batch_norm else nn.Identity(),
                    act(),
                ]
            if residual:
                blocks.append(ResidualBlock(nn.Sequential(*layers[:-1]), _shortcut(channels, width, batch_norm), act()))
            else:  # a flat Sequential, as before the key existed: the layer names of saved state_dicts stay valid
                blocks += layers
            blocks.append(pool(pooling_kernel_size, pooling_stride))
            channels = width
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, dense_neurons),
            act(),
            nn.Dropout(dropout),
            nn.Linear(dense_neurons, num_classes),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _shortcut(channels: int, width: int, batch_norm: bool) -> nn.Module:
    """The identity when the block keeps the width, else a 1x1 projection to it (with BN when the convs have it)."""
    if channels == width:
        return nn.Identity()
    conv = nn.Conv2d(channels, width, 1, bias=not batch_norm)
    return nn.Sequential(conv, nn.BatchNorm2d(width)) if batch_norm else conv
