"""fp32 against bf16 + channels_last on the embedded digits sample: test accuracy over several seeds, and speed.

Decides the default of `train.precision` / `train.channels_last`: the faster setting becomes the default only
where accuracy is unchanged within the seed-to-seed noise. Runs `dvc exp run evaluate@flexible` once per seed and
setting in a temporary git + DVC copy of the project (the workspace, its metrics and DVC cache are untouched), with
the committed params.yaml otherwise. Prints each run's test accuracy and training seconds, then per setting the mean
and spread of accuracy and the speed ratio to fp32.

    .venv/bin/python benchmarks/precision_digits.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from inatpipe.testing import copy_pipeline, pipeline_env

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "fp32": {"train.precision": "fp32", "train.channels_last": "false", "evaluate.precision": "fp32"},
    "bf16 + channels_last": {"train.precision": "bf16", "train.channels_last": "true", "evaluate.precision": "bf16"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "project"
        copy_pipeline(ROOT, work, user="bench")
        env = pipeline_env(work)

        def run(*cmd: str) -> None:
            result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

        run(sys.executable, "-m", "inatpipe.cli", "data", "setup")
        run("git", "add", "-A")
        run("git", "commit", "-qm", "the pipeline on the digits sample")
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in SETTINGS}
        for seed in args.seeds:
            for name, overrides in SETTINGS.items():
                sets = [arg for key, value in {"seed": seed, **overrides}.items() for arg in ("-S", f"{key}={value}")]
                run(sys.executable, "-m", "dvc", "exp", "run", "evaluate@flexible", *sets)
                trained = json.loads((work / "metrics/train_flexible/metrics.json").read_text())
                tested = json.loads((work / "metrics/evaluate/flexible/metrics.json").read_text())
                accuracy, loss, seconds = tested["test"]["accuracy"], tested["test"]["loss"], trained["train_seconds"]
                runs[name].append((accuracy, loss, seconds))
                print(f"seed {seed}  {name:<22} test accuracy {accuracy:.4f}  loss {loss:.4f}  {seconds:6.1f} s")

    print(f"\ncores: {os.cpu_count()}   FlexibleCNN with the committed params.yaml, digits sample, seeds {args.seeds}")
    base = statistics.mean(seconds for _, _, seconds in runs["fp32"])
    for name, results in runs.items():
        accuracies = [accuracy for accuracy, _, _ in results]
        seconds = statistics.mean(s for _, _, s in results)
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"{name:<22} test accuracy {statistics.mean(accuracies):.4f} ± {spread:.4f} (min {min(accuracies):.4f})"
            f"   training {seconds:6.1f} s = {base / seconds:.2f} x fp32's speed"
        )


if __name__ == "__main__":
    main()
