"""Test-time augmentation: the views of a batch that evaluate and predict score, whose probabilities they average
(training/calibration.py's `calibrated_logits`, which also applies the checkpoint's temperature to each view)."""

from __future__ import annotations

import typing

import torch
from torch import nn

from inatpipe.params.evaluate import Tta

TTA_MODES: tuple[str, ...] = typing.get_args(Tta)  # none | hflip, as evaluate.tta and `predict --tta` accept


def view_logits(model: nn.Module, x: torch.Tensor, tta: str = "none") -> list[torch.Tensor]:
    """The logits of `model` on each view of the image batch `x` (N, C, H, W): the images themselves, and for
    `hflip` their horizontal mirrors too, scored in one forward pass of twice the batch (in eval mode every image's
    logits are its own, whatever else is in the batch)."""
    if tta == "none":
        return [model(x)]
    if tta == "hflip":
        return list(model(torch.cat([x, x.flip(-1)])).chunk(2))
    raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {', '.join(TTA_MODES)}")
