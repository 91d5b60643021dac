"""The one place that picks the device, sets the number of torch threads, and seeds every random number generator."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from inatpipe.cores import THREADS_ENV, usable_cores
from inatpipe.dvc_cli import queue_workers
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
    deterministic_kernels(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    return torch.Generator().manual_seed(seed)


def deterministic_kernels(on: bool) -> None:
    """`torch.use_deterministic_algorithms(on, warn_only=True)` for eager runs, without the import of
    torch._inductor.config it makes (about 2 s of torch._dynamo and sympy per process, which every stage and sweep
    trial would pay). The flag it sets there only steers torch.compile's kernels: `compiled` sets it where a run
    compiles."""
    if "torch._inductor.config" in sys.modules:  # already paid for: the public call sets both flags
        torch.use_deterministic_algorithms(on, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(on, warn_only=True)


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model), its inductor kernels deterministic when eager ones are (`deterministic_kernels`)."""
    import torch._inductor.config as inductor_config

    inductor_config.deterministic = torch.are_deterministic_algorithms_enabled()
    return torch.compile(model)


def threads_for(cores: int, workers: int, override: str | None) -> int:
    """Torch threads for one stage: `override` (INATPIPE_THREADS) if set, else an equal share of the cores."""
    if override:
        if not override.isdigit() or int(override) < 1:
            raise UserError(f"{THREADS_ENV}={override!r} must be a whole number >= 1 (torch threads per stage)")
        return int(override)
    return max(1, cores // max(workers, 1))


def configure_threads() -> int:
    """Give this stage its share of the cores: all of them, or cores / N when `dvc queue start -j N` runs N at once.

    Oversubscribed cores make N experiments side by side slower than running them one by one; INATPIPE_THREADS
    overrides the share. Returns the number of threads set.
    """
    override = os.environ.get(THREADS_ENV)
    workers = queue_workers()
    if not override and workers == 0:
        return torch.get_num_threads()  # not in a queue: torch's own default
    threads = threads_for(usable_cores(), workers, override)
    torch.set_num_threads(threads)
    why = f"{THREADS_ENV}" if override else f"{usable_cores()} cores shared by {workers} queue workers"
    print(f"torch threads: {threads} ({why})")
    return threads
