"""Resume states: what a training run needs to continue after a crash exactly as if it had never stopped.

A training stage writes one at the end of every epoch (atomically, outside DVC's outputs, which DVC deletes before
rerunning a stage) and removes it when the stage completes. A state is only used when the params, code and data it
was written with are the current ones (exactly what dvc.yaml declares the stage depends on); otherwise it is
discarded with a line saying which of them changed.
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

from inatpipe import torchfile
from inatpipe.dvc_cli import stage_inputs
from inatpipe.errors import UserError
from inatpipe.params import lookup, read_raw
from inatpipe.training.ema import WeightAverage
from inatpipe.training.loop import EpochMetrics
from inatpipe.training.recipe import Progress

FORMAT_VERSION = 1
# Data files up to this size are fingerprinted by content; larger ones (image arrays, cached features) by size and
# modification time: hashing them would cost a large share of an epoch, and a rewritten file gets a new time.
CONTENT_LIMIT = 1 << 20


@dataclass(frozen=True)
class Resumable:
    """Where a training stage keeps its resume state, and which stage of dvc.yaml it is: a state is only used while
    everything that stage declares it depends on (deps and params) is as it was when the state was written."""

    path: Path
    stage: str


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two part lists hash alike by concatenation
        h.update(part)
    return h.hexdigest()


def _files(dep: str) -> list[Path]:
    path = Path(dep)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _data(path: Path) -> bytes:
    try:
        st = path.stat()
    except OSError:
        return f"{path} missing".encode()
    if st.st_size <= CONTENT_LIMIT:
        return path.as_posix().encode() + path.read_bytes()
    return f"{path} {st.st_size} {st.st_mtime_ns}".encode()


def fingerprint(resumable: Resumable, device: torch.device, params_file: Path = Path("params.yaml")) -> dict[str, str]:
    """Digests of what decides a run's result: exactly the stage's deps and params in dvc.yaml, and the device.

    Code is the content of the stage's source deps (under src/ and stages/) and the torch version; data is every
    other dep, by content (by size and time above CONTENT_LIMIT); params are the values of the keys it declares.
    Editing a module the stage does not import (the sweep report, say) keeps a resume state.
    """
    raw = read_raw(params_file)
    deps, keys = stage_inputs(resumable.stage, raw)
    params = {key: lookup(raw, key) for key in keys}
    params_json = json.dumps({**params, "resolved_device": str(device)}, sort_keys=True, default=str).encode()
    files = [f for dep in deps for f in _files(dep)]
    code = [f for f in files if f.parts[0] in ("src", "stages")]
    data = [f for f in files if f.parts[0] not in ("src", "stages")]
    return {
        "params": _digest([params_json]),
        "code": _digest([torch.__version__.encode(), *(f.as_posix().encode() + f.read_bytes() for f in code)]),
        "data": _digest(_data(f) for f in data),
    }


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
    ema: dict[str, torch.Tensor]  # the weight average and its update count; empty without `ema`
    rng: dict[str, Any]


def save_state(path: Path, state: ResumeState) -> None:
    """Write atomically: a crash mid-write leaves the previous epoch's state, never a truncated one."""
    model = {k: v.detach().cpu() for k, v in state.model.items()}
    # Tensors the best epoch shares with the current one (all of them when the last epoch was the best, the frozen
    # backbone of a transfer-learned model) point at one storage, which torch.save then writes once.
    best = {k: model[k] if torch.equal(v.cpu(), model[k]) else v.detach().cpu() for k, v in state.best_model.items()}
    payload = {
        "format_version": FORMAT_VERSION,
        **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
        "progress": dataclasses.asdict(state.progress),
        "history": [dataclasses.asdict(m) for m in state.history],
        "model": model,
        "best_model": best,
    }
    torchfile.save(payload, path)


def load_state(path: Path, current: dict[str, str]) -> ResumeState | None:
    """The state at `path` if it was written with the `current` fingerprint; otherwise None, and a state that
    cannot be used is removed with one line saying why (training then starts from epoch 1)."""
    if not path.is_file():
        return None
    try:
        raw = torchfile.load(path, what="resume state", fix="it is discarded")
        if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError("unknown format")
        state = ResumeState(**{f.name: raw[f.name] for f in dataclasses.fields(ResumeState)})
        if not isinstance(state.fingerprint, dict):
            raise ValueError("no fingerprint")
        state.progress = Progress(**raw["progress"])
        state.history = [EpochMetrics(**m) for m in raw["history"]]
    except Exception as e:  # truncated, foreign or older files: never a reason to stop training
        why = "unreadable" if isinstance(e, UserError) else type(e).__name__
        discard(path, f"it is not a readable resume state ({why})")
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
    ema: WeightAverage | None = None
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
        ema: WeightAverage | None = None,
    ) -> ResumeRun:
        """Load a matching state at `path` into the freshly built model, optimizer, schedule, loss scaler and weight
        average (the RNGs are restored later, by `continued`); without one, the run starts from epoch 1."""
        start = load_state(path, fingerprint)
        if start is not None:
            model.load_state_dict(start.model)
            optimizer.load_state_dict(start.optimizer)
            scheduler.load_state_dict(start.scheduler)
            if scaler is not None and start.scaler:
                scaler.load_state_dict(start.scaler)
            if ema is not None and start.ema:
                ema.load_state_dict(start.ema)
        return cls(path, fingerprint, optimizer, scheduler, scaler, generator, ema, start)

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
            ema=self.ema.state_dict() if self.ema is not None else {},
            rng=capture_rng(self.generator),
        )
        save_state(self.path, state)

    def finish(self) -> None:
        remove_state(self.path)
