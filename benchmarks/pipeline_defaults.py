"""Time the whole pipeline with the committed params.yaml on the embedded sample, stage by stage.

Runs in a temporary git + DVC copy of the project, so the workspace, its metrics and its DVC cache are untouched.
Prints each stage's wall time, the total, FlexibleCNN's test accuracy, and the export stage's parity per model.

    .venv/bin/python benchmarks/pipeline_defaults.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from inatpipe.testing import STAGES, copy_pipeline, pipeline_env

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "project"
        copy_pipeline(ROOT, work, user="bench")
        env = pipeline_env(work)

        def run(*cmd: str) -> None:
            subprocess.run(cmd, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        run("git", "commit", "-q", "--allow-empty", "-m", "x")
        run(sys.executable, "-m", "inatpipe.cli", "data", "setup")

        seconds = {}
        for stage in STAGES:
            start = time.perf_counter()
            run(sys.executable, "-m", "dvc", "repro", "--single-item", stage)
            seconds[stage] = time.perf_counter() - start
        accuracy = json.loads((work / "metrics/evaluate/flexible/metrics.json").read_text())["test"]["accuracy"]
        resnet = json.loads((work / "metrics/train_resnet/metrics.json").read_text())
        parity = {m: json.loads((work / f"metrics/export/{m}.json").read_text()) for m in ("flexible", "resnet")}

    total = sum(seconds.values())
    print(f"cores: {os.cpu_count()}   python: {sys.version.split()[0]}")
    for stage, s in seconds.items():
        print(f"  {stage:<20} {s:7.1f} s")
    print(f"pipeline total          {total:7.1f} s")
    print(f"FlexibleCNN test acc    {accuracy:7.4f}")
    print(f"ResNet pretrained       {resnet['pretrained']}")
    for model, p in parity.items():
        print(
            f"export {model:<9} {p['images']} test images, top-1 mismatches {p['top1_mismatches']}, largest logit "
            f"difference {p['max_abs_logit_diff']:.2g}, images/s torch {p['torch_images_per_second']} onnxruntime "
            f"{p['onnxruntime_images_per_second']}, {p['onnx_megabytes']} MB"
        )


if __name__ == "__main__":
    main()
