"""Torch files: saved atomically, and loaded with weights_only (no code from the file runs) or failed with one line.

The one helper for every torch file the project reads: checkpoints, ResNet weights, cached features, resume states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inatpipe.atomic import atomic_open
from inatpipe.errors import UserError


def save(obj: Any, path: str | Path) -> None:
    """Write atomically (temp file, fsync, rename): a crash or kill leaves the old file or the new one, whole."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load(path: str | Path, *, what: str, fix: str, mmap: bool = False) -> Any:
    """The object in torch file `path`, on the CPU; a missing or unreadable file is a UserError of one line:
    `<what> <path> not found; <fix>` or `<path> is not a readable <what> (<why>); <fix>`."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} not found; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file raises one of several unrelated types
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable {what} ({why}); {fix}") from None
