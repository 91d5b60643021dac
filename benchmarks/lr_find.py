"""`inatpipe lr-find` against one training epoch, on the embedded sample and on a bigger folder.

In a temporary git + DVC copy of the project per dataset: `dvc repro stats` (the prepared data the test needs), then
`inatpipe lr-find` with its default steps (wall time of the whole command: imports, set-up, steps, figure), then
`stages/train_flexible.py` with `train.epochs` 1 (the epoch's own time, as the stage prints it). Prints both, the
steps run, and the suggested rate beside the shipped `train.learning_rate`.

    .venv/bin/python benchmarks/lr_find.py                      # the embedded sample, and 12,000 Fashion-MNIST images
    .venv/bin/python benchmarks/lr_find.py --only sample

The bigger folder is the first 12,000 training and 2,000 test images of Fashion-MNIST from Debian's
`dataset-fashion-mnist` package, written as PNG files (benchmarks/fashion_mnist.py reads them).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inatpipe.testing import copy_pipeline, pipeline_env

sys.path.insert(0, str(Path(__file__).parent))
from fashion_mnist import CLASSES, DEBIAN_FILES, idx_file, read_idx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fashion_subset(out: Path, train: int = 12000, test: int = 2000) -> None:
    for subset, prefix, n in (("train", "train", train), ("val", "t10k", test)):
        images = read_idx(idx_file(DEBIAN_FILES, f"{prefix}-images-idx3-ubyte"))[:n]
        labels = read_idx(idx_file(DEBIAN_FILES, f"{prefix}-labels-idx1-ubyte"))[:n]
        for name in CLASSES:
            (out / subset / name).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(np.asarray(img), "L").save(out / subset / CLASSES[label] / f"{i:05d}.png")


def run(cwd: Path, *cmd: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=pipeline_env(cwd), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr, time.perf_counter() - start


def measure(name: str, project: Path) -> None:
    run(project, sys.executable, "-m", "dvc", "repro", "-q", "stats")
    out, lr_find_seconds = run(project, sys.executable, "-m", "inatpipe.cli", "lr-find")
    data = json.loads((project / "reports/lr_find/lr_find.json").read_text())
    per_epoch = int(re.search(r"\((\d+) per epoch\)", out).group(1))
    params = project / "params.yaml"
    params.write_text(re.sub(r"^  epochs: \d+", "  epochs: 1", params.read_text(), count=1, flags=re.M))
    out, _ = run(project, sys.executable, "stages/train_flexible.py")
    epoch_seconds = float(re.search(r"epoch 1/1 .*?([\d.]+)s", out).group(1))
    s = data["suggestion"]
    print(
        f"{name}: {per_epoch} steps per epoch; lr-find {data['steps_run']} of {data['steps']} steps in "
        f"{lr_find_seconds:.1f} s (whole command) vs one epoch {epoch_seconds:.1f} s; lowest loss at "
        f"{s['minimum']:.2e}, steepest {s['steepest']:.2e}, recommended {s['recommended']:.1e} (shipped 2.0e-3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("sample", "fashion"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sample", "fashion"):
            if args.only and args.only != name:
                continue
            project = Path(tmp) / name
            copy_pipeline(ROOT, project)
            if name == "sample":
                run(project, sys.executable, "-m", "inatpipe.cli", "data", "sample", "--no-track")
            else:
                fashion_subset(project / "data")
            subprocess.run(["git", "add", "-A"], cwd=project, check=True)  # dvclive needs a commit to run on
            subprocess.run(["git", "commit", "-qm", "benchmark copy"], cwd=project, check=True)
            measure(name, project)


if __name__ == "__main__":
    main()
