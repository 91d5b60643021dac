"""Random search: sweep.yaml is checked entry by entry, sampling is reproducible, and every sample is a valid params."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from inatpipe.errors import UserError
from inatpipe.params import parse_params, read_raw
from inatpipe.sweep.report import build_report
from inatpipe.sweep.space import (
    Choice,
    Range,
    check_space,
    format_value,
    load_space,
    parse_space,
    sample_configs,
    with_overrides,
)

from .conftest import ROOT
from .project import Project
from .stages import Result, inatpipe


@pytest.fixture(scope="module")
def raw_params() -> dict:
    return read_raw(ROOT / "params.yaml")


def space_of(parameters: dict) -> dict:
    return parse_space({"parameters": parameters})


def test_shipped_space_is_the_reports_and_samples_valid_params(raw_params):
    space = load_space(ROOT / "sweep.yaml")
    check_space(space, raw_params)
    assert set(space["model.filter_pattern"].values) >= {"uniform", "doubling", "halving", "bottleneck"}
    assert space["model.kernel_size"].values == (3, 5, 7)
    assert space["model.dropout"].values == (0.0, 0.2, 0.3)
    assert space["model.batch_norm"].values == (True, False)
    assert space["model.activation"].values == ("ReLU", "GELU", "SiLU", "Mish")
    assert space["train.learning_rate"] == Range(1e-5, 1e-3, log=True, integer=False)
    configs = sample_configs(space, raw_params, n=20, seed=0)
    assert len(configs) == 20 and len({repr(c) for c in configs}) == 20
    for config in configs:
        parse_params(with_overrides(raw_params, config))  # raises if any sampled value is invalid
        for key, value in config.items():
            spec = space[key]
            if isinstance(spec, Choice):
                assert value in spec.values
            else:
                assert spec.low <= value <= spec.high


def test_sampling_is_reproducible_for_a_seed(raw_params):
    space = load_space(ROOT / "sweep.yaml")
    first = sample_configs(space, raw_params, n=10, seed=7)
    assert sample_configs(space, raw_params, n=10, seed=7) == first
    assert sample_configs(space, raw_params, n=10, seed=8) != first


def test_log_range_covers_each_decade_alike_and_int_ranges_give_ints(raw_params):
    space = space_of(
        {
            "train.learning_rate": {"min": 1.0e-5, "max": 1.0e-3, "log": True},
            "model.dense_neurons": {"min": 8, "max": 64},
        }
    )
    configs = sample_configs(space, raw_params, n=400, seed=0)
    rates = [c["train.learning_rate"] for c in configs]
    assert all(1e-5 <= r <= 1e-3 for r in rates)
    below = sum(r < 1e-4 for r in rates) / len(rates)
    assert 0.4 < below < 0.6  # uniform over [1e-5, 1e-3] would put only ~9% below 1e-4
    widths = [c["model.dense_neurons"] for c in configs]
    assert all(isinstance(w, int) and 8 <= w <= 64 for w in widths)
    assert len(set(widths)) > 30


def test_rounded_draws_stay_inside_the_range(raw_params):
    space = space_of({"train.learning_rate": {"min": 1.2345e-5, "max": 1.2345e-3, "log": True}})
    rates = [c["train.learning_rate"] for c in sample_configs(space, raw_params, n=400, seed=1)]
    assert min(rates) >= 1.2345e-5 and max(rates) <= 1.2345e-3
    assert all(r == float(f"{r:.3g}") or r in (1.2345e-5, 1.2345e-3) for r in rates)


def test_combinations_invalid_together_are_never_sampled(raw_params):
    # Alone each depth is valid (the explicit list is used), but 6 blocks pool 32 px down to nothing.
    space = space_of(
        {"model.filter_pattern": {"values": ["uniform", "doubling"]}, "model.depth": {"values": [4, 5, 6]}}
    )
    check_space(space, raw_params)
    configs = sample_configs(space, raw_params, n=4, seed=0)
    assert {c["model.depth"] for c in configs} == {4, 5}


def test_a_space_smaller_than_n_is_an_error(raw_params):
    space = space_of({"model.kernel_size": {"values": [3, 5]}})
    with pytest.raises(UserError, match="found only 2 distinct valid configurations"):
        sample_configs(space, raw_params, n=3, seed=0)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"model.kernal_size": {"values": [3]}}, "sweep.yaml: model.kernal_size is not a key of params.yaml (did you"),
        ({"model": {"values": [3]}}, "sweep.yaml: model is not a key of params.yaml"),
        ({"model.kernel_size": {"values": []}}, "sweep.yaml: model.kernel_size: values must be a non-empty list"),
        (
            {"model.kernel_size": {"values": [3, 4]}},
            "sweep.yaml: model.kernel_size: 4 is not valid (params.yaml: model",
        ),
        ({"model.dropout": {"min": 0.5, "max": 0.1}}, "sweep.yaml: model.dropout: min (0.5) is greater than max (0.1)"),
        ({"model.dropout": {"min": 0.0, "max": 1.5}}, "sweep.yaml: model.dropout: 1.5 is not valid"),
        ({"train.learning_rate": {"min": 0, "max": 1, "log": True}}, "train.learning_rate: a log range needs min > 0"),
        ({"train.learning_rate": {"min": 1.0e-5}}, "train.learning_rate: a range needs both min and max"),
        ({"model.dropout": {"values": [0.1], "min": 0.0}}, "model.dropout: give either values or min/max"),
        ({"model.dropout": {"choices": [0.1]}}, "sweep.yaml: model.dropout: unknown field 'choices'"),
        ({"model.dropout": 0.1}, "sweep.yaml: model.dropout must be a mapping"),
        ({}, "sweep.yaml: parameters is empty"),
    ],
)
def test_bad_entries_are_named(raw_params, parameters, message):
    with pytest.raises(UserError) as err:
        check_space(parse_space({"parameters": parameters}), raw_params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_top_level_field_is_an_error():
    with pytest.raises(UserError, match=r"sweep\.yaml must hold one mapping, `parameters:`"):
        parse_space({"parameters": {"model.dropout": {"values": [0.1]}}, "method": "random"})


@pytest.mark.parametrize(
    ("value", "text"),
    [(1e-5, "1.0e-05"), (0.000862, "0.000862"), (0.2, "0.2"), (3, "3"), (True, "true"), ([8, 16], "[8,16]")],
)
def test_values_are_written_as_dvc_reads_them(value, text):
    assert format_value(value) == text
    assert yaml.safe_load(text) == value  # a float keeps its dot, so every YAML reader gets a float back
    assert format_value("a,b") == "'a,b'"  # a bare comma would make Hydra queue a grid


def run_cli(cwd: Path, *args: str) -> Result:
    return inatpipe(cwd, *args)


def test_cli_dry_run_prints_named_queue_commands(tmp_path: Path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(ROOT / "sweep.yaml", tmp_path / "sweep.yaml")
    result = run_cli(tmp_path, "sweep", "queue", "--n", "3", "--seed", "0", "--name", "lr", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"would run: dvc exp run --queue -n lr-0{i} -S model.filter_pattern=")
        assert "-S train.learning_rate=" in line
    again = run_cli(tmp_path, "sweep", "queue", "--n", "3", "--seed", "0", "--name", "lr", "--dry-run")
    assert again.stdout == result.stdout


def test_cli_bad_sweep_yaml_is_one_line_and_exit_2(tmp_path: Path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = "parameters:\n  model.kernel_size: {values: [3, 5]}\n  train.learning_rate: {min: 1.0e-3, max: 1.0e-5}\n"
    (tmp_path / "sweep.yaml").write_text(before)
    result = run_cli(tmp_path, "sweep", "queue", "--n", "2", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sweep.yaml: train.learning_rate: min (0.001) is greater than max (1e-05)"
    assert result.stdout == ""
    assert (tmp_path / "sweep.yaml").read_text() == before


def test_report_without_finished_experiments_is_one_line_and_exit_2(tmp_path: Path):
    p = Project(tmp_path)
    p.env["PYTHONPATH"] = str(ROOT / "src")  # an empty project: the library comes from this checkout
    p.git("init", "-q")
    p.dvc("init", "-q")
    p.git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "empty")
    result = inatpipe(tmp_path, "sweep", "report")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no finished experiments to rank; queue some with")
    assert "Traceback" not in result.stderr and not (tmp_path / "reports").exists()


def experiment(name: str, val: float, loss: float, trained: str, scored: str, test: float) -> dict:
    """One experiment as `dvc exp show --json` lists it: its params, its metrics, and the hashes of the checkpoint
    train_flexible wrote (outs) and evaluate@flexible scored (deps)."""
    metrics = {
        "metrics/train_flexible/metrics.json": {"data": {"best": {"val_accuracy": val, "val_loss": loss}}},
        "metrics/evaluate/flexible/metrics.json": {"data": {"test": {"accuracy": test}}},
    }
    data = {
        "params": {"params.yaml": {"data": {"model": {"kernel_size": int(name[-1])}}}},
        "metrics": metrics,
        "outs": {"models/flexible.pt": {"hash": trained}},
        "deps": {"models/flexible.pt": {"hash": scored}},
    }
    return {"name": name, "executor": {"state": "success"}, "revs": [{"rev": f"{name}0rev", "data": data}]}


def test_report_shows_a_test_accuracy_only_for_the_checkpoint_the_experiment_trained(tmp_path: Path):
    show = [
        {
            "rev": "abc1234",
            "data": {"params": {"params.yaml": {"data": {"model": {"kernel_size": 3}}}}},
            "experiments": [
                experiment("e-5", 0.9, 0.30, trained="h5", scored="h5", test=0.85),  # evaluated its own checkpoint
                experiment("e-7", 0.9, 0.20, trained="h7", scored="h3", test=0.60),  # the baseline's metrics, kept
                experiment("e-9", 0.8, 0.10, trained="h9", scored="h9", test=0.70),
            ],
        }
    ]
    report = build_report(show, tmp_path / "sweep")
    assert [e.name for e in report.ranked] == ["e-7", "e-5", "e-9"]  # val accuracy, then the lower val loss
    assert [e.test_accuracy for e in report.ranked] == [None, 0.85, 0.70]
    text = (tmp_path / "sweep" / "report.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    assert [row.split("|")[-3].strip() for row in rows] == ["–", "0.8500", "0.7000"]
