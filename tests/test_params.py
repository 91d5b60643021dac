"""params.yaml validation: the shipped file loads, and each kind of bad input names its key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inatpipe.errors import ConfigError
from inatpipe.params import ACTIVATIONS, Params, load_params, parse_params

from .conftest import ROOT
from .stages import run_cli


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(raw: dict, key: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def test_shipped_params_load_with_the_documented_keys():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.seed == 42
    assert p.data.test_dir == "val" and p.data.val_fraction == 0.2
    assert p.model.num_filters == (32, 64, 128, 256, 512)
    assert p.train.batch_size == 64 and p.train.learning_rate == pytest.approx(2e-3)
    assert (p.train.optimizer, p.train.scheduler, p.train.label_smoothing) == ("adamw", "cosine", 0.1)
    assert p.resnet.weights == "imagenet" and p.resnet.batch_size == 32
    assert (p.resnet.arch, p.resnet.strategy) == ("resnet50", "head")  # fast: the head trains on cached features
    # One set of recipe keys for both training stages.
    transfer_only = ("arch", "weights", "require_pretrained", "strategy", "unfreeze", "head_epochs", "lr_decay")
    assert [f for f in vars(p.train)] == [f for f in vars(p.resnet) if f not in transfer_only]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model.kernel_size", 4, "model.kernel_size must be an odd integer"),
        ("model.kernel_size", 0, "model.kernel_size must be an odd integer"),
        ("model.kernel_size", "3", "model.kernel_size must be an integer"),
        ("model.kernel_size", True, "model.kernel_size must be an integer"),
        ("model.dropout", 1.0, "model.dropout must be in [0, 1)"),
        ("model.dropout", -0.1, "model.dropout must be in [0, 1)"),
        ("model.activation", "Swish", "model.activation must be one of ReLU, GELU, SiLU, Mish"),
        ("model.pooling", "min", "model.pooling must be one of max, avg"),
        ("model.num_filters", [], "model.num_filters must be a non-empty list"),
        ("model.num_filters", [32, "64"], "model.num_filters[1] must be an integer"),
        ("model.num_filters", 32, "model.num_filters must be a list"),
        ("model.batch_norm", "yes", "model.batch_norm must be true or false"),
        ("model.convs_per_block", 0, "model.convs_per_block must be an integer >= 1"),
        ("model.residual", 2, "model.residual must be true or false, got 2"),
        ("model.residual", "yes", "model.residual must be true or false, got 'yes'"),
        ("train.learning_rate", "fast", "train.learning_rate must be a number"),
        ("train.learning_rate", 0.0, "train.learning_rate must be a positive number"),
        ("train.epochs", 0, "train.epochs must be an integer >= 1"),
        ("resnet.batch_size", 2.5, "resnet.batch_size must be an integer"),
        ("train.optimizer", "rmsprop", "train.optimizer must be one of adam, adamw, sgd, got 'rmsprop'"),
        ("resnet.optimizer", "Adam", "resnet.optimizer must be one of adam, adamw, sgd"),
        ("train.scheduler", "step", "train.scheduler must be one of constant, cosine, onecycle, got 'step'"),
        ("resnet.scheduler", None, "resnet.scheduler must be a string"),
        ("train.warmup_epochs", -0.5, "train.warmup_epochs must be a number of epochs >= 0, got -0.5"),
        ("resnet.warmup_epochs", "1", "resnet.warmup_epochs must be a number (a number; write floats as 1.0e-3)"),
        ("train.label_smoothing", 1.0, "train.label_smoothing must be in [0, 1)"),
        ("resnet.label_smoothing", -0.1, "resnet.label_smoothing must be in [0, 1)"),
        ("train.mixup", -0.2, "train.mixup must be a number >= 0 (the Beta distribution's alpha; 0 turns MixUp off)"),
        ("resnet.cutmix", "on", "resnet.cutmix must be a number"),
        ("train.mix_switch_prob", 1.5, "train.mix_switch_prob must be in [0, 1]"),
        ("train.ema", 1.0, "train.ema must be in [0, 1) (the EMA decay per step, e.g. 0.999; 0 turns it off)"),
        ("resnet.ema", -0.5, "resnet.ema must be in [0, 1)"),
        ("data.policy", "autoaugment", "data.policy must be one of basic, trivialaugment, randaugment"),
        ("data.random_erasing", 1.2, "data.random_erasing must be in [0, 1]"),
        ("train.patience", -1, "train.patience must be an integer >= 0 (0 turns early stopping off)"),
        ("train.patience", 2.5, "train.patience must be an integer"),
        ("resnet.grad_clip", -1.0, "resnet.grad_clip must be a number >= 0"),
        ("train.max_minutes", -5, "train.max_minutes must be a number >= 0 (0: no time limit)"),
        ("train.precision", "fp8", "train.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
        ("resnet.channels_last", "yes", "resnet.channels_last must be true or false"),
        ("train.compile", "yes", "train.compile must be true or false, got 'yes'"),
        ("resnet.compile", 1, "resnet.compile must be true or false, got 1"),
        ("evaluate.precision", "half", "evaluate.precision must be one of auto, fp32, bf16, fp16"),
        ("evaluate.tta", "vflip", "evaluate.tta must be one of none, hflip, got 'vflip'"),
        ("evaluate.tta", False, "evaluate.tta must be a string, got False"),
        ("evaluate.calibrate", "maybe", "evaluate.calibrate must be true or false, got 'maybe'"),
        ("evaluate.calibrate", 1, "evaluate.calibrate must be true or false, got 1"),
        ("train.weight_decay", -0.01, "train.weight_decay must be a number >= 0"),
        ("resnet.arch", "resnet51", "resnet.arch must be one of resnet18, resnet34, resnet50"),
        ("resnet.strategy", "unfrozen", "resnet.strategy must be one of head, partial, full, staged"),
        ("resnet.unfreeze", 0, "resnet.unfreeze must be an integer from 1 (layer4) to 4 (layer1-layer4), or 5"),
        ("resnet.unfreeze", 6, "resnet.unfreeze must be an integer from 1 (layer4)"),
        ("resnet.lr_decay", 0.0, "resnet.lr_decay must be in (0, 1]"),
        ("resnet.lr_decay", 1.5, "resnet.lr_decay must be in (0, 1]"),
        ("resnet.head_epochs", -1, "resnet.head_epochs must be an integer >= 0"),
        ("data.val_fraction", 1.0, "data.val_fraction must be between 0 and 1"),
        ("data.image_size", 4, "data.image_size must be an integer >= 8"),
        ("data.max_bad_fraction", 1.0, "data.max_bad_fraction must be in [0, 1)"),
        ("data.max_bad_fraction", -0.1, "data.max_bad_fraction must be in [0, 1)"),
        ("data.test_dir", "train", "data.test_dir must be a different folder from data.train_dir"),
        ("device", "tpu", "device must be one of auto, cpu, cuda, mps"),
        ("seed", -1, "seed must be an integer >= 0"),
    ],
)
def test_bad_values_name_the_key_and_what_it_accepts(raw, key, value, message):
    with pytest.raises(ConfigError, match=r"^params\.yaml: ") as err:
        parse_params(with_value(raw, key, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_suggests_the_close_one(raw):
    raw["model"]["kernal_size"] = 5
    with pytest.raises(ConfigError, match=r"unknown key model\.kernal_size \(did you mean model\.kernel_size\?\)"):
        parse_params(raw)


def test_unknown_section_is_an_error(raw):
    raw["optimiser"] = {"name": "sgd"}
    with pytest.raises(ConfigError, match="unknown key optimiser"):
        parse_params(raw)


def test_missing_key_is_named(raw):
    del raw["train"]["weight_decay"]
    with pytest.raises(ConfigError, match=r"missing key train\.weight_decay"):
        parse_params(raw)


def test_section_that_is_not_a_mapping(raw):
    raw["model"] = [1, 2]
    with pytest.raises(ConfigError, match="model must be a mapping"):
        parse_params(raw)


def test_too_many_pooling_blocks_for_the_image_size(raw):
    raw["data"]["image_size"] = 16
    raw["model"]["num_filters"] = [8, 8, 8, 8, 8]
    with pytest.raises(ConfigError, match="pools down to nothing at block 5"):
        parse_params(raw)


def test_every_listed_activation_exists_in_torch():
    from torch import nn

    for name in ACTIVATIONS:
        assert isinstance(getattr(nn, name)(), nn.Module)


def test_exponent_floats_read_as_numbers(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text().replace("learning_rate: 2.0e-3", "learning_rate: 1e-4", 1)
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").train.learning_rate == pytest.approx(1e-4)


def test_ints_are_accepted_for_floats(raw):
    assert parse_params(with_value(raw, "data.rotation", 15)).data.rotation == 15.0


def test_invalid_yaml_names_the_line(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("seed: 42\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")


def run_stage(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / script)], cwd=cwd, capture_output=True, text=True)


def test_stage_reports_bad_params_in_one_line_without_traceback(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text().replace("kernel_size: 3", "kernel_size: 4", 1)
    (tmp_path / "params.yaml").write_text(text)
    result = run_stage("train_flexible.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: model.kernel_size must be an odd integer >= 1 "
        "(same-padding needs an odd size: 1, 3, 5, 7, ...), got 4"
    ]
    assert not (tmp_path / "models").exists()


def test_bad_residual_value_stops_training_in_one_line(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text().replace("residual: false", "residual: 2", 1)
    (tmp_path / "params.yaml").write_text(text)
    result = run_cli(tmp_path, "train_flexible")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: params.yaml: model.residual must be true or false, got 2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_evaluate_reports_a_bad_tta_in_one_line(tmp_path: Path):
    """The stage itself, once (a bad evaluate.calibrate is in the table of bad values above, read in-process)."""
    line, bad, message = "tta: none", "tta: vflip", "evaluate.tta must be one of none, hflip, got 'vflip'"
    text = (ROOT / "params.yaml").read_text()
    assert line in text
    (tmp_path / "params.yaml").write_text(text.replace(line, bad, 1))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "evaluate.py"), "flexible"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: params.yaml: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_stage_without_data_says_how_to_get_it(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = run_cli(tmp_path, "split")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: data/train/ not found; run `make data` for the embedded sample "
        "or `inatpipe data fetch` for iNaturalist 12K"
    ]


@pytest.mark.parametrize("section", ["train", "resnet"])
@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_one_key_epochs_override_runs_with_every_default(raw, section, epochs):
    """`dvc exp run -S train.epochs=1` is the first thing people try: no default may make it fail. A warm-up that
    would fill the run is halved to fit, and says so in one line."""
    p = parse_params(with_value(raw, f"{section}.epochs", epochs))
    recipe = getattr(p, section)
    default = raw[section]["warmup_epochs"]
    if default < epochs:
        assert recipe.warmup == default and recipe.adjustments() == []
    else:
        assert recipe.warmup == epochs / 2
        assert recipe.adjustments() == [
            f"{section}.warmup_epochs ({default:g}) is not shorter than {section}.epochs ({epochs}): warming up over "
            f"the first half of the run ({epochs / 2:g} epochs) instead"
        ]


@pytest.mark.parametrize(
    ("epochs", "head_epochs", "head_phase"), [(5, 0, 0), (5, 2, 2), (5, 5, 4), (1, 1, 0), (3, 9, 2)]
)
def test_staged_head_phase_leaves_the_unfrozen_stages_an_epoch(raw, epochs, head_epochs, head_phase):
    raw["resnet"].update({"strategy": "staged", "epochs": epochs, "head_epochs": head_epochs, "warmup_epochs": 0.0})
    recipe = parse_params(raw).resnet
    assert recipe.head_phase == head_phase
    shortened = [line for line in recipe.adjustments() if line.startswith("resnet.head_epochs")]
    assert shortened == (
        []
        if head_phase == head_epochs
        else [
            f"resnet.head_epochs ({head_epochs}) leaves no epoch of resnet.epochs ({epochs}) for the unfrozen "
            f"stages: training the head alone for {head_phase} epochs instead"
        ]
    )


@pytest.mark.parametrize(
    ("strategy", "unfreeze", "stages"), [("head", 3, 0), ("partial", 2, 2), ("staged", 1, 1), ("full", 1, 5)]
)
def test_strategy_decides_how_many_backbone_stages_train(raw, strategy, unfreeze, stages):
    raw["resnet"].update({"strategy": strategy, "unfreeze": unfreeze})
    assert parse_params(raw).resnet.trainable_stages == stages
