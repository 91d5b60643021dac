"""The pipeline's stages run in this process: each stage module's `run(params)` in a project folder, as `dvc repro`
would run `python stages/<stage>.py` there, without a new interpreter (and torch import) per stage.

A run can be recorded: which params keys the stage read and which files it opened, for reading and for writing,
in this process and in its loader workers. tests/test_dvc_yaml.py checks those against dvc.yaml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

from inatpipe.errors import exit_on_user_error
from inatpipe.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]

_modules: dict[str, ModuleType] = {}


def stage_module(script: str) -> ModuleType:
    """stages/<script>.py, imported once (stages/ is no package)."""
    if script not in _modules:
        spec = importlib.util.spec_from_file_location(f"stage_{script}", ROOT / "stages" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class Record:
    """What one stage did: params keys read (dotted), and files opened, relative to the project when inside it."""

    params: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)


# --- params: a copy of Params whose every field read is noted ------------------------------------------------


def _recording_class(cls: type) -> type:
    names = {f.name for f in dataclasses.fields(cls)}

    def getattribute(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in names and not dataclasses.is_dataclass(value):
            log, prefix = object.__getattribute__(self, "_record")
            log.add(prefix + name)
        return value

    return type(cls.__name__, (cls,), {"__getattribute__": getattribute})


def recording(obj: Any, log: set[str], prefix: str = "") -> Any:
    """A copy of the params dataclass `obj` (and the sections in it) that adds every key read to `log`."""
    copy = object.__new__(_recording_class(type(obj)))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = recording(value, log, f"{prefix}{f.name}.")
        object.__setattr__(copy, f.name, value)
    object.__setattr__(copy, "_record", (log, prefix))
    return copy


# --- files: an audit hook on `open` ------------------------------------------------------------------------------

_state = threading.local()
_active: dict[str, Any] = {}  # while a recorded stage runs: the pid that runs it, the log file of its workers


def _skip() -> bool:
    """Opens made while fingerprinting a resume state are no input of the stage's result: they read every dep."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "inatpipe.training.resume":
            return True
        frame = frame.f_back
    return False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _active or getattr(_state, "busy", False):
        return
    path, mode, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    _state.busy = True
    try:
        if _skip():
            return
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & (os.O_WRONLY | os.O_RDWR)
        )
        line = f"{'w' if writing else 'r'} {os.path.abspath(os.fsdecode(path))}\n"
        if os.getpid() == _active["pid"]:
            _active["lines"].append(line)
        else:  # a forked loader worker: its memory dies with it, so its opens go to a file
            fd = os.open(_active["workers"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, line.encode())
            os.close(fd)
    finally:
        _state.busy = False


sys.addaudithook(_audit)


def _relative(path: str, root: Path) -> str | None:
    p = Path(path)
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else None


# --- running -----------------------------------------------------------------------------------------------------


def run(root: Path, stage: str, params: Params | None = None, record: bool = False) -> Record:
    """Run `stage` (a dvc.yaml stage name; `evaluate@flexible` for a foreach item) in project `root`; raises what
    the stage raises. With `record`, returns what it read and opened."""
    script, _, item = stage.partition("@")
    module = stage_module(script)
    result = Record()
    root = root.resolve()
    with inside(root):
        p = params or load_params()
        if record:
            p = recording(p, result.params)
            _active.update(pid=os.getpid(), lines=[], workers=str(root / f".opens-{os.getpid()}.log"))
        try:
            module.run(p, *([item] if item else []))
        finally:
            if record:
                workers, lines = Path(_active["workers"]), _active["lines"]
                _active.clear()
                lines += workers.read_text().splitlines(True) if workers.is_file() else []
                workers.unlink(missing_ok=True)
                for line in lines:
                    kind, path = line.rstrip("\n").split(" ", 1)
                    rel = _relative(path, root)
                    if rel is not None:
                        (result.written if kind == "w" else result.read).add(rel)
    return result


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _captured(cwd: Path, main) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with inside(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def run_cli(root: Path, stage: str) -> Result:
    """`python stages/<stage>.py` as the command line runs it (errors as one line and exit status 2), here."""
    script, _, item = stage.partition("@")
    module = stage_module(script)
    return _captured(root, lambda: exit_on_user_error(lambda: module.run(load_params(), *([item] if item else []))))


def inatpipe(cwd: Path, *args: str) -> Result:
    """`inatpipe <args>` in `cwd`, here (the DVC commands it runs are real subprocesses)."""
    from inatpipe.cli import main

    return _captured(cwd, lambda: main(list(args)))


def folder_project(root: Path, overrides: dict) -> Path:
    """A project folder holding what the stages read besides data: params.yaml (with `overrides`, section by section),
    dvc.yaml (a resume state matches the deps it declares), stages/ and src/ (which those deps name). No git, no DVC."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml",):
        (root / name).write_text((ROOT / name).read_text())
    for name in ("stages", "src"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def saved_epoch(state: Path) -> int:
    """The epoch of the resume state at `state`, 0 while there is none."""
    try:  # mmap: the epoch without reading the weights
        return torch.load(state, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # not written yet; written atomically, so never half-read
        return 0


def wait_for_saved_epoch(state: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the resume state at `state` is of `epoch` or later (or `proc` ended); returns its epoch. It is
    read again only when it changed, so that waiting takes no CPU from the run it waits for."""
    deadline, seen, saved = time.monotonic() + timeout, None, 0
    while saved < epoch and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        with contextlib.suppress(OSError):
            stamp = state.stat().st_mtime_ns
            if stamp != seen:
                seen, saved = stamp, saved_epoch(state)
    return saved
