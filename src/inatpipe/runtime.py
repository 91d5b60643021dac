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


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, make kernels deterministic, and return a generator for data loaders."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Deterministic kernels cost a little speed and buy identical metrics for identical params on CPU.
    # warn_only: a few CUDA ops have no deterministic version; they should warn, not stop training.
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)
