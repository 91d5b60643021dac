"""Cached backbone features in the real pipeline: an experiment on the head's recipe reruns train_resnet and no
feature pass; augmentation switches the cache off. Real DVC in a temporary git repo, resnet18, tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from inatpipe.checkpoint import load_checkpoint

from .project import new_project

pytestmark = pytest.mark.slow


def test_head_experiments_reuse_the_cached_backbone_features(tmp_path: Path):
    weights = tmp_path / "resnet18.pth"
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), weights)
    overrides = {
        "data": {"image_size": 32, "augment": False},
        "resnet": {"arch": "resnet18", "weights": str(weights), "epochs": 2, "batch_size": 8},
    }
    p = new_project(tmp_path / "project", overrides, train_per_class=8, test_per_class=2, size=16)
    out = p.dvc("repro", "train_resnet").stdout
    assert "Running stage 'features'" in out and "resnet18 features: train (19, 512), val (5, 512)" in out
    assert "cached backbone features from artifacts/features/backbone.pt" in out
    p.git("add", "-A")
    p.git("commit", "-qm", "cached head")

    # A head setting makes train_resnet stale, and only it.
    p.set_params({"resnet": {"learning_rate": 3.0e-3}})
    stale = json.loads(p.dvc("status", "--json", "train_resnet").stdout)
    p.git("checkout", "--", "params.yaml")
    assert set(stale) == {"train_resnet"}

    before = p.json("metrics/train_resnet/metrics.json")
    out = p.dvc("exp", "run", "-S", "resnet.learning_rate=3.0e-3", "-S", "resnet.epochs=3", "train_resnet").stdout
    assert "Running stage 'train_resnet'" in out and "Running stage 'features'" not in out
    assert "cached backbone features from artifacts/features/backbone.pt" in out and "features train" not in out
    after = p.json("metrics/train_resnet/metrics.json")
    assert after["train"]["loss"] != before["train"]["loss"] and after["stop"]["epoch"] == 3
    assert {k: after[k] for k in ("strategy", "arch", "backbone_features", "pretrained", "params_trainable")} == {
        "strategy": "head",
        "arch": "resnet18",
        "backbone_features": "cached",
        "pretrained": True,
        "params_trainable": 512 * 3 + 3,
    }
    # The checkpoint is the complete model, backbone included, as evaluate and predict expect.
    model, meta = load_checkpoint(p.root / "models" / "resnet.pt")
    assert meta["model_config"] == {"arch": "resnet18"}
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)

    # Augmentation on: no features to reuse, said so, and the backbone runs every epoch.
    out = p.dvc("exp", "run", "-S", "data.augment=true", "train_resnet").stdout
    assert "Running stage 'features'" in out and "Running stage 'train_resnet'" in out
    assert "full forward pass every epoch: data.augment is on" in out
    assert json.loads((p.root / "artifacts" / "features" / "skipped.json").read_text())["skipped"] is True
    assert p.json("metrics/train_resnet/metrics.json")["backbone_features"] == "forward"
