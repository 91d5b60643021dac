"""Time one small sweep run one at a time (`dvc queue start -j 1`) and two at a time (`-j 2`).

Runs in a temporary git + DVC copy of the project on the embedded digits sample, so the workspace, its
experiments and its DVC cache are untouched. The sweep is a 2 x 2 grid (kernel size x activation) of
train_flexible for `--epochs` epochs; both runs queue the same four experiments, and the run-cache is cleared
in between so the second run trains instead of restoring results. With `--oversubscribed`, a third run uses -j 2
with INATPIPE_THREADS set to all cores in each experiment, which is what -j 2 did before each stage took its share.

    .venv/bin/python benchmarks/sweep_parallel.py [--epochs 2] [--oversubscribed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inatpipe.testing import copy_pipeline, pipeline_env

ROOT = Path(__file__).resolve().parents[1]
GRID = ("-S", "model.kernel_size=5,7", "-S", "model.activation=ReLU,GELU")


class Copy:
    def __init__(self, work: Path):
        self.work = work
        self.env = pipeline_env(work)
        self.env.pop("INATPIPE_THREADS", None)

    def run(self, *cmd: str, env: dict | None = None) -> str:
        result = subprocess.run(cmd, cwd=self.work, env={**self.env, **(env or {})}, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def dvc(self, *args: str, env: dict | None = None) -> str:
        return self.run(sys.executable, "-m", "dvc", *args, env=env)

    def workers_running(self) -> bool:
        # Read the workers' own state files: polling `dvc queue status` would itself take CPU from the sweep.
        files = list((self.work / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"))
        return not files or any(json.loads(f.read_text()).get("returncode") is None for f in files)

    def sweep(self, jobs: int, env: dict | None = None) -> float:
        """Queue the grid, run it with -j `jobs`, and return the wall time from start to the last worker's exit."""
        shutil.rmtree(self.work / ".dvc/cache/runs", ignore_errors=True)
        for info in (self.work / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"):
            info.unlink()  # the last sweep's exited workers
        self.dvc("exp", "run", "--queue", "train_flexible", *GRID, env=env)
        start = time.perf_counter()
        self.dvc("queue", "start", "-j", str(jobs), env=env)
        while self.workers_running():
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        status = self.dvc("queue", "status")
        tasks = status.split("\n\n")[0].splitlines()[1:]  # the task table, before "Worker status: ..."
        failed = [line.split()[1] for line in tasks if not line.endswith("Success")]
        for name in failed:  # a failed experiment makes the time meaningless: say so, with its log
            print(f"experiment {name} failed (-j {jobs}); its log:\n{self.dvc('queue', 'logs', name)}", file=sys.stderr)
        self.dvc("queue", "remove", "--success", "--failed")
        return seconds if not failed else float("nan")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--epochs", type=int, default=2, help="train.epochs of each experiment (default: 2)")
    args.add_argument("--oversubscribed", action="store_true", help="also time -j 2 with all cores per experiment")
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "project"
        copy_pipeline(ROOT, work, user="bench")
        p = Copy(work)
        p.run(sys.executable, "-m", "inatpipe.cli", "data", "setup")
        text = (work / "params.yaml").read_text()
        (work / "params.yaml").write_text(text.replace("  epochs: 10 ", f"  epochs: {opts.epochs} ", 1))
        p.run("git", "add", "-A")
        p.run("git", "commit", "-qm", "project")  # dvclive needs a commit to run in
        p.dvc("repro", "train_flexible")
        p.run("git", "add", "-A")
        p.run("git", "commit", "-qm", "baseline")

        one = p.sweep(1)
        two = p.sweep(2)
        over = p.sweep(2, env={"INATPIPE_THREADS": str(os.cpu_count())}) if opts.oversubscribed else None

    print(f"cores: {os.cpu_count()}   4 experiments of train_flexible, {opts.epochs} epochs each, digits sample")
    print(f"  dvc queue start -j 1              {one:7.1f} s")
    print(f"  dvc queue start -j 2              {two:7.1f} s   = {two / one:.2f} x the -j 1 time")
    if over is not None:
        label = f"-j 2, INATPIPE_THREADS={os.cpu_count()}"
        print(f"  {label:<33}{over:7.1f} s   = {over / one:.2f} x the -j 1 time")


if __name__ == "__main__":
    main()
