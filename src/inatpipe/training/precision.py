"""How forward passes compute: the autocast precision (auto, fp32, bf16, fp16) and the memory layout of images.

Training, the feature pass and evaluation all run forward passes through these, so a change of precision policy
is made once; this module imports nothing of the training loop, so evaluation does not depend on it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Autocast dtypes. bf16 keeps fp32's range, so it needs no loss scaling; fp16 does (see `grad_scaler`).
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CPU with AVX-512 BF16 or AMX, a GPU from Ampere on. Elsewhere
    bf16 is emulated, slower than fp32."""
    return _native_bf16(device.type)


@functools.cache  # autocast asks on every batch; the hardware does not change during a run
def _native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """`auto` becomes bf16 where the device computes it natively (benchmarks/precision_digits.py: faster, with the
    same accuracy), else fp32; any other setting stays as it is."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def emulated_bf16_warning(device: torch.device, precision: str, key: str) -> str | None:
    """A line for a run that asks for bf16 (`key`: the params key) on a device that only emulates it, where each step
    takes several times longer than in fp32 (on a CPU with AVX2 alone, FlexibleCNN's training steps ran 12x slower:
    docs/benchmarks.md); `auto` would have chosen fp32 there."""
    if precision != "bf16" or native_bf16(device):  # `auto` takes bf16 only where it is native
        return None
    hardware = "AVX-512 BF16 or AMX" if device.type == "cpu" else "native bf16"
    return (
        f"warning: {key}: bf16 on this {device.type} (no {hardware}) is emulated and runs several times slower than "
        f"fp32; set {key}: auto to use fp32 here"
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes and losses: matmuls and convolutions in bf16/fp16, reductions in fp32."""
    dtype = DTYPES[resolve_precision(device, precision)]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC for channels_last (the layout CPU and GPU convolution kernels run fastest on), else as it is."""
    return torch.channels_last if channels_last else torch.preserve_format


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on `device`, in the memory layout the model was put in (NHWC for channels_last)."""
    layout = memory_format(channels_last and x.dim() == 4)
    return x.to(device, memory_format=layout, non_blocking=True)
