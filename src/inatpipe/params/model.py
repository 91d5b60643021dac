"""The `model` section: FlexibleCNN's architecture, its conv widths given as a list or as a named pattern."""

import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from inatpipe.params.filters import EXPLICIT, FILTER_PATTERNS, expand_filters
from inatpipe.params.schema import Rule, Section, at_least, one_of, plain, within

# Names of torch.nn activation modules that take no required arguments; FlexibleCNN builds them by name.
Activation = Literal["ReLU", "GELU", "SiLU", "Mish", "LeakyReLU", "ELU", "SELU", "Tanh", "Hardswish"]
Pooling = Literal["max", "avg"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)


@dataclass(frozen=True)
class ModelParams(Section):
    """FlexibleCNN architecture: one conv block per entry of `filters`, then a dense layer.

    `filters` is `num_filters` as written when `filter_pattern` is `explicit`, else the pattern expanded with
    `base_filters` and `depth` (see filters.py).
    """

    SECTION: ClassVar[str] = "model"

    num_filters: Annotated[
        tuple[int, ...],
        Rule(
            lambda v: len(v) > 0 and all(n > 0 for n in v), "a non-empty list of positive integers, e.g. [32, 64, 128]"
        ),
    ]
    filter_pattern: Annotated[str, one_of(FILTER_PATTERNS)]  # explicit, or a pattern of filters.py
    base_filters: Annotated[int, at_least(1)]
    depth: Annotated[int, at_least(1, note="(conv blocks)")]
    kernel_size: Annotated[
        int,
        Rule(lambda v: v >= 1 and v % 2 == 1, "an odd integer >= 1 (same-padding needs an odd size: 1, 3, 5, 7, ...)"),
    ]
    activation: Activation
    batch_norm: bool
    dropout: Annotated[float, within(0, 1)]
    pooling: Pooling
    pooling_kernel_size: Annotated[int, at_least(1)]
    pooling_stride: Annotated[int, at_least(1)]
    dense_neurons: Annotated[int, at_least(1)]
    convs_per_block: Annotated[int, at_least(1)]
    residual: bool  # a shortcut around each block's convolutions (identity, or 1x1 where the width changes)

    @property
    def filters(self) -> tuple[int, ...]:
        """The conv widths that run: `num_filters`, or the pattern's expansion."""
        if self.filter_pattern == EXPLICIT:
            return self.num_filters
        return expand_filters(self.filter_pattern, self.base_filters, self.depth)

    def architecture(self) -> dict[str, Any]:
        """FlexibleCNN's keyword arguments, with `num_filters` resolved: what a checkpoint records and rebuilds."""
        config = plain(self)
        for key in ("filter_pattern", "base_filters", "depth"):
            del config[key]
        config["num_filters"] = list(self.filters)
        return config
