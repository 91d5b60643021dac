"""Models: output shapes for every configuration axis, the registry, and ResNet transfer-learning details."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from inatpipe.errors import UserError
from inatpipe.models import MODELS, build_model, count_parameters
from inatpipe.models.flexible_cnn import FlexibleCNN
from inatpipe.models.resnet import TransferResNet, load_pretrained
from inatpipe.params import ACTIVATIONS, POOLINGS

SMALL = {"num_filters": (4, 8), "dense_neurons": 16}


def forward_ok(model: nn.Module, image_size: int, num_classes: int, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, image_size, image_size))
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    model = FlexibleCNN(num_classes=5, image_size=16, activation=activation, **SMALL)
    forward_ok(model, 16, 5)
    assert sum(isinstance(m, getattr(nn, activation)) for m in model.modules()) == 3  # 2 conv blocks + dense


@pytest.mark.parametrize(("pooling", "kernel_size"), list(itertools.product(POOLINGS, (1, 3, 5, 7))))
def test_pooling_and_odd_kernels_keep_size_before_pooling(pooling, kernel_size):
    model = FlexibleCNN(num_classes=3, image_size=20, kernel_size=kernel_size, pooling=pooling, **SMALL)
    forward_ok(model, 20, 3)
    first_conv = model.features[0]
    assert first_conv(torch.zeros(1, 3, 20, 20)).shape[-2:] == (20, 20)
    pool_type = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pooling]
    assert sum(isinstance(m, pool_type) for m in model.modules()) == 2


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_any_depth_from_the_filter_list(depth):
    filters = tuple(8 * 2**i for i in range(depth))
    model = FlexibleCNN(num_classes=4, image_size=32, num_filters=filters, dense_neurons=8)
    forward_ok(model, 32, 4)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == list(filters)


def test_convs_per_block_stack_before_each_pool():
    model = FlexibleCNN(num_classes=3, image_size=16, num_filters=(4, 8), dense_neurons=8, convs_per_block=2)
    forward_ok(model, 16, 3)
    kinds = [type(m).__name__ for m in model.features]
    block = ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"]
    assert kinds == block * 2
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [4, 4, 8, 8]
    assert [m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [3, 4, 4, 8]


def test_flattened_size_follows_the_input_shape():
    # 24 -> pool(3, stride 2) -> 11 -> 5: the dense layer sees 8 channels * 5 * 5.
    model = FlexibleCNN(num_classes=2, image_size=24, num_filters=(4, 8), pooling_kernel_size=3, pooling_stride=2)
    assert model.head[1].in_features == 8 * 5 * 5
    forward_ok(model, 24, 2)


def test_batch_norm_off_gives_biased_convs_and_no_norm_layers():
    model = FlexibleCNN(num_classes=2, image_size=16, batch_norm=False, **SMALL)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    with_bn = FlexibleCNN(num_classes=2, image_size=16, batch_norm=True, **SMALL)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 2


def test_dropout_rate_is_applied():
    model = FlexibleCNN(num_classes=2, image_size=16, dropout=0.3, **SMALL)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3]


def test_report_defaults_at_224():
    model = FlexibleCNN(num_classes=10, image_size=224)
    forward_ok(model, 224, 10, batch=1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_and_runs(name):
    config = {"flexible_cnn": {"image_size": 32, **SMALL}, "resnet": {"arch": "resnet18"}}[name]
    model = build_model(name, 7, config)
    forward_ok(model, 32, 7)


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'vgg'"):
        build_model("vgg", 2, {})


def test_frozen_resnet_trains_only_its_head_and_keeps_batchnorm_statistics():
    model = TransferResNet(num_classes=3, arch="resnet18")
    total, trainable = count_parameters(model)
    assert trainable == 512 * 3 + 3 and total > 11_000_000
    model.train()
    assert model.head.training and not model.backbone.training
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    loss = model(torch.randn(4, 3, 32, 32)).sum()
    loss.backward()
    assert torch.equal(bn.running_mean, before)
    assert model.backbone.conv1.weight.grad is None and model.head.weight.grad is not None


def test_resnet50_defaults_have_the_reports_head():
    model = TransferResNet(num_classes=10)
    assert count_parameters(model)[1] == 2048 * 10 + 10


def test_backbone_loads_a_torchvision_state_dict_file(tmp_path: Path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = TransferResNet(num_classes=4, arch="resnet18")
    assert load_pretrained(model, str(path), "resnet18", require=False) is True
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_mismatched_state_dict_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="does not match the backbone"):
        load_pretrained(TransferResNet(num_classes=4, arch="resnet34"), str(path), "resnet34", require=False)


def test_missing_or_unreadable_weights_file(tmp_path: Path):
    model = TransferResNet(num_classes=2, arch="resnet18")
    with pytest.raises(UserError, match="not found"):
        load_pretrained(model, str(tmp_path / "nope.pth"), "resnet18", require=False)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch state_dict"):
        load_pretrained(model, str(tmp_path / "junk.pth"), "resnet18", require=False)


def test_weights_none_keeps_the_random_initialisation():
    model = TransferResNet(2, "resnet18")
    before = model.backbone.conv1.weight.clone()
    assert load_pretrained(model, "none", "resnet18", require=False) is False
    assert torch.equal(model.backbone.conv1.weight, before)


def _can_reach(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def test_imagenet_weights_without_network_warn_or_fail_as_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, so torchvision must download
    online = _can_reach("download.pytorch.org")
    model = TransferResNet(num_classes=2, arch="resnet18")
    if online:  # a user's machine: the real download path must load the weights
        assert load_pretrained(model, "imagenet", "resnet18", require=False) is True
        return
    assert load_pretrained(model, "imagenet", "resnet18", require=False) is False
    err = capsys.readouterr().err
    assert "WARNING: ImageNet weights for resnet18 could not be loaded" in err
    assert "https://download.pytorch.org/models/resnet18" in err and str(tmp_path) in err
    with pytest.raises(UserError, match="could not be loaded"):
        load_pretrained(model, "imagenet", "resnet18", require=True)
