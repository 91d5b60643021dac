"""A copy of the pipeline in a new git + DVC repository, where the end-to-end tests and the benchmarks run it with
the real CLIs while the workspace, its metrics, experiments and DVC cache stay untouched; and `inatpipe serve` in its
own process with a client for it, for the serve tests and the load benchmark."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.error import HTTPError

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
    from dvc.repo import Repo  # here: the serve helpers below need no DVC

    with Repo.init(str(dest)):  # what `dvc init` runs, without a process (and a second of start-up) of its own
        pass
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


class ServerProcess:
    """`inatpipe serve --model <checkpoint> --port 0` in its own process (the library at `src` first on its path),
    its output in `log`; `url` once it says where it listens. `stop()` sends Ctrl-C (SIGINT) and waits."""

    def __init__(self, checkpoint: Path, log: Path, src: Path, timeout_s: float = 180):
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "inatpipe.cli", "serve", "--model", str(checkpoint), "--port", "0"],
            cwd=log.parent,
            env={**os.environ, "PYTHONPATH": str(src)},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while not (found := re.search(r"on (http://127\.0\.0\.1:\d+/)", log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"inatpipe serve did not start ({self.process.wait()}):\n{log.read_text()}")
            time.sleep(0.2)
        self.url = found.group(1)

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def http(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of a GET, or of a POST of `body`; an error status is an answer
    like any other."""
    headers = {"Content-Type": content_type} if content_type else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=120) as r:
            status, answer, data = r.status, r.headers, r.read()
    except HTTPError as e:
        status, answer, data = e.code, e.headers, e.read()
    return status, {k.lower(): v for k, v in answer.items()}, data


def post_file(url: str, data: bytes, filename: str = "image.jpg", field: str = "file") -> tuple[int, dict, bytes]:
    """POST `data` as one file field of a multipart/form-data body, as a browser's form sends it."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return http(url, body, f"multipart/form-data; boundary={boundary}")
