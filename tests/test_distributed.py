"""Training under torchrun: two CPU processes (gloo) train the model one process trains, and write its outputs once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from inatpipe.checkpoint import load_checkpoint

from .conftest import ROOT, write_dataset

pytestmark = pytest.mark.slow

PARAMS = {
    "device": "cpu",
    "data": {"image_size": 16, "augment": False, "num_workers": 0},
    # No batch norm and no dropout: then only the gradient averaging differs from one process, and that is exact.
    "model": {"num_filters": [8, 16], "dense_neurons": 32, "batch_norm": False, "dropout": 0.0},
    # fp32: bf16 would round differently on half batches, and the comparison below is to 1e-5.
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "scheduler": "constant",
        "warmup_epochs": 0.0,
        "learning_rate": 3.0e-3,
        "precision": "fp32",
    },
}


def run(root: Path, *cmd: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *cmd], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_two_gloo_processes_train_like_one_and_write_once(tmp_path: Path):
    root = tmp_path / "project"
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in PARAMS.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_dataset(root / "data", train_per_class=12, test_per_class=2, size=16)
    for stage in ("split", "prepare", "stats"):
        run(root, f"stages/{stage}.py")

    results = {}
    for procs in (1, 2):
        torchrun = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}")
        out = run(root, *torchrun, "stages/train_flexible.py")
        assert out.count("epoch 1/2 ") == 1 and out.count("epoch 2/2 ") == 1, out  # rank 0 alone reports
        metrics = root / "metrics" / "train_flexible"
        history = (metrics / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        assert len(history) == 3, history  # the header and one row per epoch: written by one process
        model, _ = load_checkpoint(root / "models" / "flexible.pt", torch.device("cpu"))
        results[procs] = json.loads((metrics / "metrics.json").read_text()), model.state_dict()
        shutil.rmtree(root / "metrics")
        shutil.rmtree(root / "models")

    (one, one_weights), (two, two_weights) = results[1], results[2]
    for key in ("train", "val"):
        for metric in ("loss", "accuracy"):
            assert two[key][metric] == pytest.approx(one[key][metric], abs=1e-5), (key, metric)
    assert one["train"]["loss"] > 0 and two["best"]["epoch"] == one["best"]["epoch"]
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-4)
