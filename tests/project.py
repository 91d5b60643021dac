"""A temporary git + DVC copy of the project on a tiny generated dataset, driven through the real CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from inatpipe.testing import copy_pipeline, pipeline_env

from .conftest import ROOT, write_dataset

SMALL_LR = 1.0e-3
# Small models, few epochs; the shipped warm-up (train.warmup_epochs: 1.0) stays, as a user's one-key override sees it.
SMALL_PARAMS = {
    "data": {"image_size": 16},
    "model": {"num_filters": [8, 16], "dense_neurons": 32},
    "train": {"epochs": 2, "batch_size": 8, "scheduler": "constant", "learning_rate": SMALL_LR},
    "resnet": {"epochs": 1, "batch_size": 8},
    "evaluate": {"batch_size": 16},
}


class Project:
    def __init__(self, root: Path):
        self.root = root
        self.env = pipeline_env(root)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def inatpipe(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "inatpipe.cli", *args, check=check)

    def git(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("git", *args)

    def json(self, path: str) -> dict:
        return json.loads((self.root / path).read_text())

    def set_params(self, overrides: dict) -> None:
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for section, values in overrides.items():
            params[section].update(values)
        path.write_text(yaml.safe_dump(params, sort_keys=False))


def new_project(root: Path, overrides: dict, **dataset) -> Project:
    """A fresh git + DVC repo at `root` holding a copy of the project and a tiny dataset, params overridden."""
    copy_pipeline(ROOT, root, user="test")
    write_dataset(root / "data", **dataset)
    p = Project(root)
    p.set_params(overrides)
    p.dvc("add", "-q", "data")
    p.git("add", "-A")
    p.git("commit", "-qm", "project with tiny data")
    return p


def make_project(root: Path, params: dict) -> Project:
    """`new_project` with the tiny dataset most end-to-end tests use."""
    return new_project(root, params, train_per_class=12, test_per_class=4, size=16)
