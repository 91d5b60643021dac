"""A copy of the pipeline in a new git + DVC repository, where the end-to-end tests and the benchmarks run it with
the real CLIs while the workspace, its metrics, experiments and DVC cache stay untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# What `dvc repro` needs besides data: the pipeline, its params, the stages and the library they import.
PIPELINE_FILES = ("dvc.yaml", "params.yaml", "sweep.yaml", ".dvcignore", ".gitignore")
PIPELINE_FOLDERS = ("stages", "src", "vendor")  # vendor: the offline page .dvc/config points `dvc plots` at
# The stages of dvc.yaml in an order `dvc repro` may run them.
STAGES = (
    "split",
    "prepare",
    "stats",
    "train_flexible",
    "features",
    "train_resnet",
    "evaluate@flexible",
    "evaluate@resnet",
    "export@flexible",
    "export@resnet",
    "compare",
)


def copy_pipeline(source: Path, dest: Path, user: str = "inatpipe") -> None:
    """Copy the pipeline of the project at `source` into `dest` and make `dest` a git + DVC repository, with `user`
    as its local commit identity and the project's DVC settings. Nothing is committed yet: callers add their data
    and params first. Stages in the copy import its own library when run with PYTHONPATH=<dest>/src."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        shutil.copy(source / name, dest / name)
    for name in PIPELINE_FOLDERS:
        shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(dest, "git", "init", "-q")
    _run(dest, "git", "config", "user.name", user)
    _run(dest, "git", "config", "user.email", f"{user}@example.com")
    _run(dest, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(source / ".dvc" / "config", dest / ".dvc" / "config")


def pipeline_env(dest: Path) -> dict[str, str]:
    """The environment to run commands in the copy at `dest` with: its stages import the copy's own library (not
    the installed one), `python` and `dvc` are this interpreter's, and DVC sends no analytics."""
    return {
        **os.environ,
        "PYTHONPATH": str(dest / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }


def _run(cwd: Path, *cmd: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}) in {cwd}:\n{result.stdout}{result.stderr}")
