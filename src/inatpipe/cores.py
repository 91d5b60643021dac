"""How many CPU cores this process may use: the one count that loader workers, scan processes and torch threads
are shared out from. No torch import: the split stage uses it too."""

from __future__ import annotations

import os

# Torch threads per stage, overriding its share of the cores (runtime.configure_threads, `sweep run -j`).
THREADS_ENV = "INATPIPE_THREADS"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's cpuset or taskset narrows it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def loader_workers(setting: int | str = "auto") -> int:
    """Loader processes for `data.num_workers`: `auto` is one per usable core but one (left to the training
    process), at most 4 (more only queue batches the model has not asked for yet); 0 on a single core. A number is
    taken as it is."""
    if setting == "auto":
        return max(0, min(4, usable_cores() - 1))
    return int(setting)
