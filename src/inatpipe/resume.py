"""Resume states: what a training run needs to continue after a crash exactly as if it had never stopped.

A training stage writes one at the end of every epoch (atomically, outside DVC's outputs, which DVC deletes before
rerunning a stage) and removes it when the stage completes. A state is only used when the params, code and data it
was written with are the current ones; otherwise it is discarded with a line saying which of them changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inatpipe.atomic import atomic_open
from inatpipe.params import Params, as_dict
from inatpipe.recipe import Progress
from inatpipe.training import EpochMetrics

FORMAT_VERSION = 1
LIBRARY = Path(__file__).resolve().parent  # src/inatpipe: every .py file here is part of the code fingerprint


@dataclass(frozen=True)
class Resumable:
    """What a stage tells the library so its run can resume: where the state lives and what it must match."""

    path: Path
    params: dict[str, Any]  # the params sections the stage reads
    stage_file: Path
    large_files: tuple[Path, ...] = ()  # other data the run reads, too large to hash: by size and time (features)


def params_sections(params: Params, *names: str) -> dict[str, Any]:
    """The named top-level sections of `params` as plain values, e.g. ("seed", "data", "train")."""
    return {name: _plain(getattr(params, name)) for name in names}


def _plain(value: Any) -> Any:
    return as_dict(value) if dataclasses.is_dataclass(value) else value


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike by concatenation
        h.update(part)
    return h.hexdigest()


def _stat(path: str | Path) -> bytes:
    try:
        st = Path(path).stat()
    except OSError:
        return f"{path} missing".encode()
    return f"{path} {st.st_size} {st.st_mtime_ns}".encode()


def fingerprint(
    resumable: Resumable, device: torch.device, data_files: Iterable[Path], images: Iterable[str]
) -> dict[str, str]:
    """Digests of what decides a run's result: params (and the device), code, data.

    Code is every library module, the stage file and the torch version. Data is the content of the small index
    and statistics files plus the size and modification time of every listed image: reading 12,000 images would
    cost a large share of an epoch, and a changed image gets a new modification time.
    """
    params = json.dumps({**resumable.params, "resolved_device": str(device)}, sort_keys=True).encode()
    code_files = [*sorted(LIBRARY.rglob("*.py")), Path(resumable.stage_file)]
    code = [torch.__version__.encode()] + [f.name.encode() + f.read_bytes() for f in code_files]
    data = [Path(f).read_bytes() for f in data_files] + [_stat(img) for img in images]
    return {"params": _digest([params]), "code": _digest(code), "data": _digest(data)}


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG a training epoch draws from, as types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),  # shuffling, and the seeds of each epoch's loader workers
    }


def restore_rng(rng: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["loader"])


@dataclass
class ResumeState:
    """A run after its last completed epoch."""

    fingerprint: dict[str, str]
    epoch: int
    elapsed_seconds: float  # training time so far, so the time budget and train_seconds span both runs
    progress: Progress
    history: list[EpochMetrics]  # every epoch so far, to rebuild the learning curves
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]  # DVC deleted the best checkpoint: it is rewritten from this
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]  # fp16's loss scale and its growth count; empty without one
    rng: dict[str, Any]


def save_state(path: Path, state: ResumeState) -> None:
    """Write atomically: a crash mid-write leaves the previous epoch's state, never a truncated one."""
    model = {k: v.detach().cpu() for k, v in state.model.items()}
    # Tensors the best epoch shares with the current one (all of them when the last epoch was the best, the frozen
    # backbone of a transfer-learned model) point at one storage, which torch.save then writes once.
    best = {k: model[k] if torch.equal(v, model[k]) else v for k, v in state.best_model.items()}
    payload = {
        "format_version": FORMAT_VERSION,
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
        "progress": dataclasses.asdict(state.progress),
        "history": [dataclasses.asdict(m) for m in state.history],
        "model": model,
        "best_model": best,
    }
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


def load_state(path: Path, current: dict[str, str]) -> ResumeState | None:
    """The state at `path` if it was written with the `current` fingerprint; otherwise None, and a state that
    cannot be used is removed with one line saying why (training then starts from epoch 1)."""
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError("unknown format")
        state = ResumeState(**{f.name: raw[f.name] for f in dataclasses.fields(ResumeState)})
        if not isinstance(state.fingerprint, dict):
            raise ValueError("no fingerprint")
        state.progress = Progress(**raw["progress"])
        state.history = [EpochMetrics(**m) for m in raw["history"]]
    except Exception as e:  # truncated, foreign or older files raise one of several unrelated types
        discard(path, f"it is not a readable resume state ({type(e).__name__})")
        return None
    changed = [key for key in ("params", "code", "data") if state.fingerprint.get(key) != current[key]]
    if changed:
        discard(path, f"{' and '.join(changed)} changed since epoch {state.epoch} was saved")
        return None
    return state


def discard(path: Path, why: str) -> None:
    tqdm.write(f"discarding the resume state {path}: {why}; training from epoch 1")
    remove_state(path)


def remove_state(path: Path) -> None:
    # With it, any temporary file a run killed while writing it left behind (see inatpipe.atomic).
    for leftover in [path, *path.parent.glob(f".{path.name}.*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    with contextlib.suppress(OSError):  # only when empty: another stage's state may live there
        path.parent.rmdir()


@dataclass
class ResumeRun:
    """A training run that saves a resume state after every epoch, and the state it started from, if any."""

    path: Path
    fingerprint: dict[str, str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator  # the loaders' generator
    start: ResumeState | None = None

    @classmethod
    def begin(
        cls,
        path: Path,
        fingerprint: dict[str, str],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        generator: torch.Generator,
    ) -> ResumeRun:
        """Load a matching state at `path` into the freshly built model, optimizer, schedule and loss scaler (the
        RNGs are restored later, by `continued`); without one, the run starts from epoch 1."""
        start = load_state(path, fingerprint)
        if start is not None:
            model.load_state_dict(start.model)
            optimizer.load_state_dict(start.optimizer)
            scheduler.load_state_dict(start.scheduler)
            if scaler is not None and start.scaler:
                scaler.load_state_dict(start.scaler)
        return cls(path, fingerprint, optimizer, scheduler, scaler, generator, start)

    @property
    def start_epoch(self) -> int:
        return self.start.epoch if self.start else 0

    def continued(self, history: Iterator[EpochMetrics]) -> Iterator[EpochMetrics]:
        """`history`, with every RNG restored right before its first epoch runs.

        Building the model, the logger and the checkpoint in between may draw random numbers; the uninterrupted
        run drew none between saving its state and starting the next epoch, so the restore must come last.
        """
        if self.start is not None:
            restore_rng(self.start.rng, self.generator)
        yield from history

    def save(
        self,
        model: nn.Module,
        best_model: dict[str, torch.Tensor],
        progress: Progress,
        history: list[EpochMetrics],
        elapsed_seconds: float,
    ) -> None:
        """Call last thing after an epoch, so the RNG states saved are those the next epoch starts from."""
        state = ResumeState(
            fingerprint=self.fingerprint,
            epoch=progress.last_epoch,
            elapsed_seconds=elapsed_seconds,
            progress=progress,
            history=history,
            model=model.state_dict(),
            best_model=best_model,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            rng=capture_rng(self.generator),
        )
        save_state(self.path, state)

    def finish(self) -> None:
        remove_state(self.path)
