"""Filter patterns: a FlexibleCNN's conv widths named by shape (uniform, doubling, ...) instead of listed.

A pattern turns `base_filters` (the narrowest block's width) and `depth` (the number of conv blocks) into the
`num_filters` list, so one sweep axis can try whole architecture shapes. Pure Python: params validation uses it.
"""

from __future__ import annotations

from collections.abc import Callable

EXPLICIT = "explicit"  # use model.num_filters as written


def _doubling_exponents(depth: int) -> list[int]:
    return list(range(depth))


def _bottleneck_exponents(depth: int) -> list[int]:
    # Narrowest in the middle: the exponent falls towards the centre block(s) and rises again.
    deepest = (depth - 1) // 2
    return [deepest - min(i, depth - 1 - i) for i in range(depth)]


# Each pattern gives, per block, the power of two that multiplies base_filters.
_EXPONENTS: dict[str, Callable[[int], list[int]]] = {
    "uniform": lambda depth: [0] * depth,  # the report's "symmetrical": the same width throughout
    "doubling": _doubling_exponents,  # the classic pyramid: narrow early, wide late
    "halving": lambda depth: _doubling_exponents(depth)[::-1],  # the report's "inverted": wide early, narrow late
    "bottleneck": _bottleneck_exponents,  # wide, narrow in the middle, wide again
    "inverted_bottleneck": lambda depth: [min(i, depth - 1 - i) for i in range(depth)],  # narrow, wide, narrow
}

FILTER_PATTERNS: tuple[str, ...] = (EXPLICIT, *_EXPONENTS)


def expand_filters(pattern: str, base_filters: int, depth: int) -> tuple[int, ...]:
    """The conv widths `pattern` gives for `depth` blocks whose narrowest block has `base_filters` filters.

    >>> expand_filters("doubling", 32, 5)
    (32, 64, 128, 256, 512)
    >>> expand_filters("bottleneck", 16, 5)
    (64, 32, 16, 32, 64)
    """
    if pattern not in _EXPONENTS:
        raise ValueError(f"unknown filter pattern {pattern!r}; known: {', '.join(_EXPONENTS)}")
    return tuple(base_filters * 2**e for e in _EXPONENTS[pattern](depth))
