"""Atomic writes: a failed or killed writer leaves the previous file whole, never a half-written one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inatpipe.atomic import atomic_open, write_json, write_text
from inatpipe.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from inatpipe.models import build_model

from .conftest import ROOT


def test_write_json_and_text(tmp_path: Path):
    write_json(tmp_path / "deep" / "m.json", {"accuracy": 0.5})
    assert json.loads((tmp_path / "deep" / "m.json").read_text()) == {"accuracy": 0.5}
    write_text(tmp_path / "t.md", "| a |\n")
    assert (tmp_path / "t.md").read_text() == "| a |\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "m.json", "t.md"], "no temporary files remain"


def test_an_error_while_writing_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write('{"new": ')
        raise RuntimeError("disk full, say")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path: Path):
    """A real process dies (SIGKILL) halfway through writing: the target still holds the complete old content."""
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    code = (
        "import os, signal, sys\n"
        "from inatpipe.atomic import atomic_open\n"
        "with atomic_open(sys.argv[1]) as f:\n"
        "    f.write('{\"new\": ' + 'x' * 100000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(target)], env={"PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == -9
    assert json.loads(target.read_text()) == {"old": True}


def test_checkpoints_are_written_atomically_and_load_with_weights_only(tmp_path: Path):
    config = {"image_size": 16, "num_filters": [4], "kernel_size": 3, "activation": "ReLU", "batch_norm": False}
    config |= {"dropout": 0.0, "pooling": "max", "pooling_kernel_size": 2, "pooling_stride": 2, "dense_neurons": 8}
    model = build_model("flexible_cnn", 3, config)
    path = tmp_path / "models" / "m.pt"
    spec = ModelSpec("flexible_cnn", config, ["a", "b", "c"], 16, [0.5] * 3, [0.2] * 3)
    save_checkpoint(path, spec, model.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == ["a", "b", "c"]
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
