"""The one place that picks the device and seeds every random number generator."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from inatpipe.errors import UserError


def choose_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, then the CPU; naming a device that is absent is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available.get(name, False):
        raise UserError(f"device {name!r} is not available on this machine; set device: auto or cpu in params.yaml")
    return torch.device(name)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_num_workers(value: int | str) -> int:
    """`auto`: one loader process per usable core but one (left to the training process), at most 4 (more only
    queue batches the model has not asked for yet); 0 on a single core. A number is taken as it is."""
    if value == "auto":
        return max(0, min(4, usable_cores() - 1))
    return int(value)


def seed_everything(seed: int, deterministic: bool = True) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a generator for data loaders.

    `deterministic` chooses deterministic kernels; without it, cuDNN benchmarks its convolution algorithms for the
    shapes it sees and keeps the fastest, which may differ from run to run.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic kernels cost a little speed and buy identical metrics for identical params on CPU.
    # warn_only: a few CUDA ops have no deterministic version; they should warn, not stop training.
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul.
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    return torch.Generator().manual_seed(seed)
