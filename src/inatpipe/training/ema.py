"""An exponential moving average of a model's weights (`ema` in the recipe): updated after every optimizer step,
validated after every epoch and checkpointed instead of the raw weights, which keep training.

torch's AveragedModel keeps the copy; BatchNorm statistics are averaged with the weights. The decay warms up as
(1 + n) / (10 + n) after n updates, capped at `ema`: the average forgets the random initial weights within the
first steps instead of dragging them along for thousands (what a short run would otherwise validate).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel


class WeightAverage:
    """The running average of `source`'s parameters and buffers."""

    def __init__(self, source: nn.Module, decay: float):
        self.source, self.decay = source, decay
        self.averaged = AveragedModel(source, multi_avg_fn=self._blend, use_buffers=True)

    def _blend(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's batch counters: the latest count
            torch._foreach_copy_(averaged, current)
            return
        n = int(num_averaged)
        decay = min(self.decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - decay)

    @property
    def model(self) -> nn.Module:
        """The averaged model: what is validated and saved."""
        return self.averaged.module

    def update(self) -> None:
        """After an optimizer step: blend the source's current weights in."""
        self.averaged.update_parameters(self.source)

    def counterpart(self, module: nn.Module) -> nn.Module:
        """The averaged copy of `module`: the source itself (or its DistributedDataParallel wrapper), or one of its
        submodules (the head a transfer run trains on stored features)."""
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        for name, m in self.source.named_modules():
            if m is inner:
                return self.model.get_submodule(name)
        raise ValueError("the module is not part of the averaged model")  # a bug in the caller

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> WeightAverage:
        self.averaged.to(device, memory_format=memory_format)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)


def weight_average(model: nn.Module, decay: float) -> WeightAverage | None:
    """The recipe's EMA of `model`, or None when `ema` is 0."""
    return WeightAverage(model, decay) if decay > 0 else None
