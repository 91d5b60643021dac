"""Transfer learning: trainable parameters per strategy and architecture, frozen BatchNorm, staged fine-tuning,
cached features against the full forward pass, and weights files of the right and wrong architecture."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch import nn

from inatpipe.checkpoint import load_checkpoint
from inatpipe.errors import UserError
from inatpipe.models import count_parameters
from inatpipe.models.resnet import ARCHS, STAGES, TransferResNet, load_pretrained
from inatpipe.params import ResnetParams, parse_params
from inatpipe.training.features import BackboneFeatures, extract, weights_fingerprint
from inatpipe.training.recipe import Progress
from inatpipe.training.resume import ResumeRun
from inatpipe.training.tracking import Optimization, RunOutputs, TrainingData
from inatpipe.training.transfer import (
    _counts,
    build_finetuning,
    discriminative_groups,
    feature_loaders,
    finetune_history,
    finetuning_steps,
    head_history,
    stage_rates,
    train_transfer,
)

from .conftest import MEAN, ROOT, STD, folder_loader, write_image_folder

pytestmark = pytest.mark.xdist_group("transfer")  # its costly fixtures are built once, on one worker

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "owl"]
LR = 1.0e-3
FINGERPRINT = {"params": "p", "code": "c", "data": "d"}


def resnet_params(**overrides) -> ResnetParams:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["resnet"].update(overrides)
    return parse_params(raw).resnet


def image_loader(folder: Path, shuffle: bool = False, batch_size: int = 8, generator: torch.Generator | None = None):
    return folder_loader(folder, CLASSES, 32, batch_size, shuffle=shuffle, generator=generator)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=6, size=32)


@pytest.fixture(scope="module")
def resnet50() -> TransferResNet:
    return TransferResNet(num_classes=10, arch="resnet50")


@pytest.mark.parametrize(
    ("strategy", "unfreeze", "trainable"),
    [
        ("head", 1, 20_490),  # 2048 * 10 + 10: the report's head
        ("partial", 1, 14_985_226),  # and layer4
        ("partial", 2, 14_985_226 + 7_098_368),  # and layer3
        ("staged", 1, 14_985_226),  # by the end of the run
        ("full", 1, 23_528_522),  # every parameter
    ],
)
def test_resnet50_trainable_parameters_per_strategy(resnet50, strategy, unfreeze, trainable):
    recipe = resnet_params(strategy=strategy, unfreeze=unfreeze)
    total, counted = _counts(resnet50, recipe.trainable_stages)
    assert (total, counted) == (23_528_522, trainable)


@pytest.mark.parametrize("stages", range(len(STAGES) + 1))
def test_resnet18_trainable_parameters_are_the_head_and_the_unfrozen_stages(stages):
    model = TransferResNet(num_classes=10, arch="resnet18")
    reference = torchvision.models.resnet18(weights=None)
    parts = {
        "stem": [reference.conv1, reference.bn1],
        **{f"layer{i}": [getattr(reference, f"layer{i}")] for i in range(1, 5)},
    }
    unfrozen = STAGES[len(STAGES) - stages :]
    expected = 512 * 10 + 10 + sum(p.numel() for s in unfrozen for m in parts[s] for p in m.parameters())
    model.set_trainable_stages(stages)
    assert count_parameters(model) == (sum(p.numel() for p in reference.parameters()) - 513_000 + 5_130, expected)
    # The optimizer gets exactly the trainable parameters, and nothing frozen.
    recipe = resnet_params(strategy="partial" if 0 < stages < 5 else "full", unfreeze=max(stages, 1))
    given = {id(p) for g in discriminative_groups(model, recipe, stages) for p in g["params"]}
    assert given == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnext50_32x4d", "wide_resnet50_2"])
def test_other_architectures_build_and_run(arch):
    model = TransferResNet(num_classes=7, arch=arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_every_listed_architecture_is_a_torchvision_model():
    assert set(ARCHS) <= set(torchvision.models.list_models(torchvision.models))
    with pytest.raises(UserError, match="unknown ResNet architecture 'vgg16'"):
        TransferResNet(num_classes=2, arch="vgg16")


def test_discriminative_rates_decay_stage_by_stage_from_the_head():
    recipe = resnet_params(strategy="full", learning_rate=LR, lr_decay=0.5)
    assert stage_rates(recipe, 5) == pytest.approx(
        {"head": LR, "layer4": LR / 2, "layer3": LR / 4, "layer2": LR / 8, "layer1": LR / 16, "stem": LR / 32}
    )
    assert stage_rates(recipe, 0) == {"head": LR}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_partial_fine_tuning_keeps_frozen_batchnorm_statistics_and_weights(images):
    torch.manual_seed(0)
    model = TransferResNet(num_classes=3, arch="resnet18")
    recipe = resnet_params(strategy="partial", unfreeze=1, epochs=1, warmup_epochs=0.0, learning_rate=LR)
    frozen_before = {s: [snapshot(m) for m in model.stage_modules(s)] for s in STAGES[:-1]}
    layer4_before = snapshot(model.backbone.layer4)
    loader = image_loader(images, shuffle=True)
    optimizer, scheduler = build_finetuning(model, recipe, len(loader))
    assert {g["stage"] for g in optimizer.param_groups} == {"head", "layer4"}
    list(finetune_history(model, recipe, Optimization(optimizer, scheduler, None), loader, image_loader(images), CPU))

    model.train()
    for stage, before in frozen_before.items():
        for module, state in zip(model.stage_modules(stage), before, strict=True):
            assert not module.training  # eval mode even while the model trains
            for key, value in module.state_dict().items():
                assert torch.equal(value, state[key]), f"{stage}.{key} changed"
    after = model.backbone.layer4.state_dict()
    assert model.backbone.layer4.training
    assert not torch.equal(after["0.bn1.running_mean"], layer4_before["0.bn1.running_mean"])
    assert not torch.equal(after["0.conv1.weight"], layer4_before["0.conv1.weight"])


def test_staged_switches_at_head_epochs_with_the_documented_rates(images):
    torch.manual_seed(0)
    model = TransferResNet(num_classes=3, arch="resnet18")
    recipe = resnet_params(
        strategy="staged",
        unfreeze=2,
        head_epochs=2,
        epochs=3,
        scheduler="constant",
        warmup_epochs=0.0,
        learning_rate=LR,
        lr_decay=0.1,
    )
    loader = image_loader(images, shuffle=True)
    optimizer, scheduler = build_finetuning(model, recipe, len(loader))

    def rates() -> dict[str, float]:
        return {g["stage"]: g["lr"] for g in optimizer.param_groups}

    assert rates() == {"head": LR, "layer4": 0.0, "layer3": 0.0}  # the late groups exist, at rate 0
    start = snapshot(model.backbone)  # weights and BatchNorm statistics
    steps = Optimization(optimizer, scheduler, None)
    history = finetune_history(model, recipe, steps, loader, image_loader(images), CPU)
    for epoch in (1, 2):
        assert next(history).epoch == epoch
        assert all(torch.equal(v, start[k]) for k, v in model.backbone.state_dict().items()), f"epoch {epoch}"
        assert not any(p.requires_grad for p in model.backbone.parameters())
    # The schedule has reached the switch: the next step trains layer4 at lr * 0.1 and layer3 at lr * 0.01.
    assert rates() == pytest.approx({"head": LR, "layer4": LR * 0.1, "layer3": LR * 0.01})
    assert next(history).epoch == 3
    assert next(history, None) is None
    after = model.backbone.state_dict()
    changed = {k.split(".")[0] for k, v in after.items() if not torch.equal(v, start[k])}
    assert changed == {"layer3", "layer4"}  # BatchNorm statistics and weights; stem, layer1, layer2 untouched
    assert [p.requires_grad for p in model.backbone.layer2.parameters()] == [False] * len(
        list(model.backbone.layer2.parameters())
    )


def test_cached_features_train_the_head_as_the_full_forward_pass_does(images):
    torch.manual_seed(0)
    uncached = TransferResNet(num_classes=3, arch="resnet18")
    cached = copy.deepcopy(uncached)
    # fp32, so both paths can be compared to 1e-5 (bf16 rounds differently in different batch shapes)
    recipe = resnet_params(
        strategy="head", epochs=2, batch_size=8, learning_rate=1.0e-2, warmup_epochs=0.0, precision="fp32"
    )

    # The same head outputs for the same weights.
    loaders = {"train": image_loader(images), "val": image_loader(images, batch_size=5)}
    meta = {"arch": "resnet18", "fingerprint": weights_fingerprint(cached.backbone)}
    # in the recipe's precision and layout, as the stages compute them
    features = extract(
        cached.backbone, loaders, CPU, meta, precision=recipe.precision, channels_last=recipe.channels_last
    )
    with torch.no_grad():
        full = torch.cat([uncached.eval()(x) for x, _ in loaders["train"]])
    assert torch.allclose(cached.head(features.features["train"]), full, atol=1e-5)
    assert features.targets["train"].tolist() == loaders["train"].dataset.targets

    # And the same training: same batches (train and val loaders share one generator, as in train_resnet, so every
    # epoch shuffles alike), same loop, same head at the end.
    optimizer, scheduler = build_finetuning(uncached, recipe, len(loaders["train"]))
    generator = torch.Generator().manual_seed(7)
    train = image_loader(images, shuffle=True, generator=generator)
    val = image_loader(images, batch_size=8, generator=generator)
    slow = list(finetune_history(uncached, recipe, Optimization(optimizer, scheduler, None), train, val, CPU))
    fast_train, fast_val = feature_loaders(features, recipe.batch_size, torch.Generator().manual_seed(7), CPU)
    fast = list(
        head_history(cached, recipe, finetuning_steps(cached, recipe, len(fast_train), CPU), fast_train, fast_val, CPU)
    )
    assert torch.allclose(cached.head.weight, uncached.head.weight, atol=1e-5)
    assert torch.equal(cached.backbone.conv1.weight, uncached.backbone.conv1.weight)
    for a, b in zip(slow, fast, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=1e-5)
        assert a.val_accuracy == b.val_accuracy


def test_stored_features_are_reused_only_with_their_own_weights_and_images(tmp_path: Path):
    meta = {"arch": "resnet18", "fingerprint": "abc", "image_size": 32}
    stored = BackboneFeatures(
        {"train": torch.ones(2, 4)}, {"train": torch.tensor([0, 1])}, {"train": ["a.png", "b.png"]}, meta
    )
    stored.save(tmp_path / "f.pt")
    loaded = BackboneFeatures.load(tmp_path / "f.pt")
    assert torch.equal(loaded.features["train"], torch.ones(2, 4))
    assert loaded.mismatch(meta, {"train": ["a.png", "b.png"]}) is None
    assert "fingerprint is 'xyz'" in loaded.mismatch({**meta, "fingerprint": "xyz"}, {"train": ["a.png", "b.png"]})
    assert "train subset lists other images" in loaded.mismatch(meta, {"train": ["a.png"]})
    (tmp_path / "junk.pt").write_text("no")
    assert BackboneFeatures.load(tmp_path / "junk.pt") is None and BackboneFeatures.load(tmp_path / "none") is None


def test_weights_file_of_another_architecture_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    model = TransferResNet(num_classes=4, arch="resnext50_32x4d")  # the same key names, other shapes
    with pytest.raises(UserError, match="does not match the backbone") as err:
        load_pretrained(model, str(path), "resnext50_32x4d", require=False)
    assert "\n" not in str(err.value) and "size mismatch" in str(err.value)
    right = TransferResNet(num_classes=4, arch="resnet50")
    assert load_pretrained(right, str(path), "resnet50", require=False) is True
    assert weights_fingerprint(right.backbone) != weights_fingerprint(TransferResNet(4, "resnet50").backbone)


def test_a_staged_run_records_its_strategy_and_counts_and_saves_the_complete_model(images, tmp_path: Path):
    torch.manual_seed(0)
    model = TransferResNet(num_classes=3, arch="resnet18")
    recipe = resnet_params(arch="resnet18", strategy="staged", unfreeze=1, head_epochs=1, epochs=2, batch_size=8)
    generator = torch.Generator().manual_seed(0)
    data = TrainingData(
        classes=CLASSES,
        image_size=32,
        mean=MEAN,
        std=STD,
        train=image_loader(images, shuffle=True, generator=generator),
        val=image_loader(images, generator=generator),
    )
    outputs = RunOutputs(tmp_path / "live", tmp_path / "resnet.pt")
    spec = data.spec("resnet", {"arch": "resnet18"})
    summary = train_transfer(model, spec, data, recipe, CPU, outputs, summary={"weights": "none", "pretrained": False})
    layer4 = sum(p.numel() for p in model.backbone.layer4.parameters())
    assert summary["params_trainable"] == 512 * 3 + 3 + layer4 and summary["params_trainable_head_epochs"] == 1539
    assert {k: summary[k] for k in ("arch", "strategy", "unfrozen", "weights")} == {
        "arch": "resnet18",
        "strategy": "staged",
        "unfrozen": "layer4",
        "weights": "none",
    }
    assert summary["stop"] == {"epoch": 2, "reason": "completed"}
    restored, meta = load_checkpoint(tmp_path / "resnet.pt")  # the complete model, as evaluate and predict load it
    assert isinstance(restored, TransferResNet) and meta["model_config"] == {"arch": "resnet18"}
    assert torch.equal(restored.backbone.conv1.weight, model.backbone.conv1.weight)  # the frozen stem


STAGED = {"arch": "resnet18", "strategy": "staged", "unfreeze": 1, "head_epochs": 2, "epochs": 4, "batch_size": 8}


def staged_run(images: Path, state: Path) -> tuple[TransferResNet, ResumeRun, Iterator]:
    """A staged fine-tuning run from its first epoch, or from the resume state at `state` when there is one."""
    recipe = resnet_params(**STAGED)
    torch.manual_seed(0)
    model = TransferResNet(num_classes=3, arch="resnet18")
    generator = torch.Generator().manual_seed(0)
    train, val = image_loader(images, shuffle=True, generator=generator), image_loader(images)
    steps = finetuning_steps(model, recipe, len(train), CPU)
    run = ResumeRun.begin(state, FINGERPRINT, model, steps.optimizer, steps.scheduler, None, generator)
    return model, run, run.continued(finetune_history(model, recipe, steps, train, val, CPU, run.start_epoch))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> tuple[nn.Module, list, Path]:
    """The staged run without a stop: its model, its epochs, and a copy of the resume state after each epoch."""
    folder = tmp_path_factory.mktemp("staged")
    model, run, history = staged_run(images, folder / "state.pt")
    progress, epochs = Progress(epochs=STAGED["epochs"]), []
    for m in history:
        progress.update(m)
        epochs.append(dataclasses.replace(m, seconds=0.0))
        run.save(model, model.state_dict(), progress, epochs, 0.0)
        shutil.copy(folder / "state.pt", folder / f"after_{m.epoch}.pt")
    return model, epochs, folder


@pytest.mark.parametrize("saved_after", [1, 2, 3])  # inside the head phase, at the switch, after it
def test_staged_resumed_after_any_epoch_trains_as_the_uninterrupted_run(uninterrupted, images, tmp_path, saved_after):
    model, epochs, folder = uninterrupted
    shutil.copy(folder / f"after_{saved_after}.pt", tmp_path / "state.pt")
    resumed, run, history = staged_run(images, tmp_path / "state.pt")
    assert run.start_epoch == saved_after
    rest = [dataclasses.replace(m, seconds=0.0) for m in history]
    assert rest == epochs[saved_after:]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in model.parameters()]
