"""Models: output shapes for every configuration axis, the registry, and ResNet transfer-learning details."""

from __future__ import annotations

import dataclasses
import itertools
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from inatpipe.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from inatpipe.errors import UserError
from inatpipe.models import MODELS, build_model, count_parameters
from inatpipe.models.flexible_cnn import FlexibleCNN, ResidualBlock
from inatpipe.models.resnet import TransferResNet, load_pretrained
from inatpipe.params import ACTIVATIONS, POOLINGS, load_params
from inatpipe.params.filters import EXPLICIT, FILTER_PATTERNS, expand_filters

from .conftest import ROOT

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


# --- model.residual: a shortcut around each block's convolutions ----------------------------------------------


@pytest.mark.parametrize("pattern", FILTER_PATTERNS)
@pytest.mark.parametrize("convs_per_block", [1, 2])
def test_residual_blocks_run_for_every_filter_pattern(pattern: str, convs_per_block: int):
    filters = list(expand_filters(pattern, 4, 3)) if pattern != EXPLICIT else [4, 8, 8]
    model = FlexibleCNN(3, 16, filters, dense_neurons=8, convs_per_block=convs_per_block, residual=True)
    forward_ok(model, 16, 3)
    blocks = [m for m in model.features if isinstance(m, ResidualBlock)]
    assert len(blocks) == len(filters)
    # the sum feeds the pool: per block, the residual block then its pooling layer
    assert [type(m).__name__ for m in model.features] == ["ResidualBlock", "MaxPool2d"] * len(filters)
    widths_in = [3, *filters[:-1]]
    for block, c_in, c_out in zip(blocks, widths_in, filters, strict=True):
        assert block(torch.zeros(2, c_in, 8, 8)).shape == (2, c_out, 8, 8)
        assert isinstance(block.shortcut, nn.Identity) == (c_in == c_out)


def test_a_residual_block_with_zeroed_convs_passes_its_input_through():
    """With every conv weight zero (and BN as initialised, in eval mode), the convs add nothing: a residual block
    gives act(x), the same block without a shortcut gives act(0) = 0."""
    plain = FlexibleCNN(2, 8, (3, 3), dense_neurons=4, convs_per_block=2, activation="ReLU", residual=False).eval()
    residual = FlexibleCNN(2, 8, (3, 3), dense_neurons=4, convs_per_block=2, activation="ReLU", residual=True).eval()
    for model in (plain, residual):
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.weight)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(residual.features[0](x), x.clamp(min=0))  # identity shortcut, then ReLU
        assert torch.equal(plain.features[:6](x), torch.zeros_like(x))  # two conv -> BN -> ReLU
        assert torch.equal(residual.features(x), torch.max_pool2d(torch.max_pool2d(x.clamp(min=0), 2), 2))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_residual_adds_only_the_one_by_one_projections(batch_norm: bool):
    filters, convs = (4, 4, 8, 16, 16), 2
    plain = FlexibleCNN(3, 32, filters, batch_norm=batch_norm, dense_neurons=8, convs_per_block=convs)
    residual = FlexibleCNN(3, 32, filters, batch_norm=batch_norm, dense_neurons=8, convs_per_block=convs, residual=True)
    # widths change 3 -> 4, 4 -> 8 and 8 -> 16: a 1x1 conv each, plus BN's scale and shift (or the conv's bias)
    projections = [(3, 4), (4, 8), (8, 16)]
    extra = sum(c_in * c_out + 2 * c_out if batch_norm else c_in * c_out + c_out for c_in, c_out in projections)
    assert count_parameters(residual)[0] - count_parameters(plain)[0] == extra
    one_by_one = [m for m in residual.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(one_by_one) == len(projections)


def test_a_checkpoint_config_without_residual_builds_the_plain_network(tmp_path: Path):
    """Checkpoints written before the key existed record no `residual`: they rebuild as they were, weights and all."""
    config = {"image_size": 16, "num_filters": [4, 8], "dense_neurons": 8}
    model = build_model("flexible_cnn", 3, config)
    assert not any(isinstance(m, ResidualBlock) for m in model.modules())
    spec = ModelSpec("flexible_cnn", config, ["a", "b", "c"], 16, [0.5] * 3, [0.2] * 3)
    save_checkpoint(tmp_path / "old.pt", spec, model.state_dict())
    loaded, meta = load_checkpoint(tmp_path / "old.pt")
    assert "residual" not in meta["model_config"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_the_model_section_records_residual_in_the_architecture():
    params = load_params(ROOT / "params.yaml")
    assert params.model.residual is False  # the report's network stays the default
    on = dataclasses.replace(params.model, residual=True).architecture()
    assert on["residual"] is True
    model = build_model("flexible_cnn", 3, {"image_size": 32, **on})
    assert sum(isinstance(m, ResidualBlock) for m in model.modules()) == len(on["num_filters"])
