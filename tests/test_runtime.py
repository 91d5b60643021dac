"""Threads per stage: a queued experiment takes cores / (live queue workers); INATPIPE_THREADS overrides it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inatpipe.dvc_cli import queue_workers
from inatpipe.errors import UserError
from inatpipe.runtime import configure_threads, threads_for


def fake_queue(root: Path, workers: list[tuple[int, int | None]]) -> Path:
    """A project whose .dvc/tmp/exps/celery holds worker files as `dvc queue start` writes them; returns a run dir."""
    celery = root / ".dvc" / "tmp" / "exps" / "celery"
    celery.mkdir(parents=True)
    for i, (pid, returncode) in enumerate(workers, 1):
        info = {"pid": pid, "stdin": None, "stdout": f"w{i}.out", "stderr": None, "returncode": returncode}
        (celery / f"dvc-exp-worker-{i}.json").write_text(json.dumps(info))
    run_dir = root / ".dvc" / "tmp" / "exps" / "tmpabc123"
    run_dir.mkdir()
    return run_dir


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_counts_live_workers_only(tmp_path: Path):
    run_dir = fake_queue(tmp_path, [(os.getpid(), None), (os.getppid(), None), (dead_pid(), None), (os.getpid(), 0)])
    env = {"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-1"}
    assert queue_workers(env, run_dir) == 2  # the exited worker and the dead pid do not count


def test_outside_a_queue_there_are_no_workers(tmp_path: Path):
    run_dir = fake_queue(tmp_path, [(os.getpid(), None), (os.getpid(), None)])
    assert queue_workers({}, run_dir) == 0
    # `dvc exp run` in the workspace sets DVC_ROOT too, but runs in the project itself, not a queue copy.
    assert queue_workers({"DVC_ROOT": str(tmp_path), "DVC_EXP_NAME": "exp-1"}, tmp_path) == 0


def test_share_of_the_cores():
    assert threads_for(cores=16, workers=4, override=None) == 4
    assert threads_for(cores=2, workers=2, override=None) == 1
    assert threads_for(cores=2, workers=3, override=None) == 1  # never zero
    assert threads_for(cores=8, workers=1, override=None) == 8
    assert threads_for(cores=8, workers=4, override="3") == 3


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_bad_override_is_a_user_error(value):
    with pytest.raises(UserError, match=f"INATPIPE_THREADS='{value}' must be a whole number >= 1"):
        threads_for(cores=2, workers=1, override=value)


def test_override_sets_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("INATPIPE_THREADS", "1")
    try:
        assert configure_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
