"""Model input in numpy alone, for predictors that run without torch (an ONNX file under onnxruntime).

`resize` squashes prepared uint8 images to the model's size exactly as `transforms.BatchResize` does on the CPU, and
`normalize` scales and normalises them exactly as `dataset.normalize` does: the same numbers, bit for bit (the tests
compare the two on many sizes). torch resizes uint8 images in integer arithmetic, as Pillow-SIMD does: per axis, the
antialiased bilinear (triangle) weights of each output pixel are rounded to 16-bit integers at the finest precision
that fits, and each pass rounds back to uint8. Pillow's own `resize` rounds its weights differently and differs by
one level on a few pixels in a hundred, which is why this is not simply Pillow.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


@functools.lru_cache(maxsize=32)
def _weights(size_in: int, size_out: int) -> tuple[np.ndarray, int]:
    """(size_out, size_in) integer weights (as float64, exact) and their precision in bits, as torch computes them
    for an antialiased bilinear resize of uint8 data (align_corners=False, no explicit scale)."""
    scale = size_in / size_out
    support = scale if scale >= 1.0 else 1.0  # the triangle filter's reach widens with the downscaling factor
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    rows = []
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates towards zero, as the C cast does
        hi = min(int(center + support + 0.5), size_in)
        w = [max(0.0, 1.0 - abs((j + lo - center + 0.5) * invscale)) for j in range(hi - lo)]
        total = sum(w)
        rows.append((lo, [v / total for v in w] if total != 0.0 else w))
    w_max = max(max(w) for _, w in rows)
    bits = 0  # the most bits of precision that keep the largest weight below 2**15
    while bits < 22 and int(0.5 + w_max * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    matrix = np.zeros((size_out, size_in))
    for i, (lo, w) in enumerate(rows):
        matrix[i, lo : lo + len(w)] = [int(0.5 + v * (1 << bits)) for v in w]
    return matrix, bits


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    matrix, bits = _weights(x.shape[axis], size)
    # Sums of uint8 x int16 products stay far below 2**53: float64 holds them exactly, and BLAS makes it fast.
    acc = np.moveaxis(x, axis, -1).astype(np.float64) @ matrix.T
    out = np.clip(np.floor((acc + (1 << (bits - 1))) / (1 << bits)), 0, 255).astype(np.uint8)
    return np.moveaxis(out, -1, axis)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """A batch of uint8 images (n, h, w, 3) squashed to (n, size, size, 3): antialiased bilinear, width first, as
    `BatchResize` resizes them."""
    if images.shape[2] != size:
        images = _resize_axis(images, size, 2)
    if images.shape[1] != size:
        images = _resize_axis(images, size, 1)
    return images


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 images (n, h, w, 3) as the model's float32 input (n, 3, h, w): scaled to [0, 1], less the mean, over
    the std, per channel, in float32 and in the order `dataset.normalize` computes it."""
    x = images.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def model_input(
    images: Sequence[np.ndarray], image_size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Prepared images (each (side, side, 3) uint8) as a model's input batch: what `predict.model_input` gives."""
    return normalize(resize(np.stack(images), image_size), mean, std)
