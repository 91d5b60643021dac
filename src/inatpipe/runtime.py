"""The one place that picks the device, the number of CPU threads, and seeds every random number generator."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

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


THREADS_ENV = "INATPIPE_THREADS"
# `dvc queue start -j N` spawns N celery workers, each recorded in this folder of the project that queued them
# (DVC_ROOT) as <name>.json holding its pid and, once it has exited, its return code.
_QUEUE_WORKERS = Path(".dvc") / "tmp" / "exps" / "celery"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def queue_workers(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> int:
    """How many DVC queue workers run side by side with this process; 0 when it does not run under `dvc queue`.

    A queued experiment runs in a temporary copy under <project>/.dvc/tmp/exps/, with DVC_ROOT naming the
    project; the queue's live workers are the ones `dvc queue start -j N` started that have not exited yet,
    so the last experiments of a sweep, running alone, get the whole machine.
    """
    root = environ.get("DVC_ROOT")
    if not root or "DVC_EXP_NAME" not in environ:
        return 0
    cwd = (cwd or Path.cwd()).resolve()
    if not cwd.is_relative_to((Path(root) / ".dvc" / "tmp" / "exps").resolve()):
        return 0  # `dvc exp run` in the workspace itself, not a queue worker's copy
    live = 0
    for info in (Path(root) / _QUEUE_WORKERS).glob("*.json"):
        try:
            worker = json.loads(info.read_text())
        except (OSError, ValueError):  # a worker writing its file right now
            continue
        if isinstance(worker, dict) and worker.get("returncode") is None and _alive(int(worker.get("pid", 0) or 0)):
            live += 1
    return max(live, 1)


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
    threads = threads_for(available_cores(), workers, override)
    torch.set_num_threads(threads)
    why = f"{THREADS_ENV}" if override else f"{available_cores()} cores shared by {workers} queue workers"
    print(f"torch threads: {threads} ({why})")
    return threads
