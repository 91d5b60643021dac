"""Search spaces and the sweep's command line, without DVC runs: sweep.yaml is checked entry by entry, becomes
Optuna distributions that give back valid params, bad input is one line; the report reads `dvc exp show` output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import yaml

from inatpipe.dvc_cli import TEMP_RUNS, clear_dead_temp_runs
from inatpipe.errors import UserError
from inatpipe.params import parse_params, read_raw
from inatpipe.sweep.report import build_report
from inatpipe.sweep.run import grid_of, suggest
from inatpipe.sweep.space import (
    Choice,
    Range,
    check_space,
    format_value,
    load_space,
    parse_space,
    with_overrides,
)
from inatpipe.sweep.study import open_storage

from .conftest import ROOT
from .project import Project
from .stages import Result, inatpipe


@pytest.fixture(scope="module")
def raw_params() -> dict:
    return read_raw(ROOT / "params.yaml")


def space_of(parameters: dict) -> dict:
    return parse_space({"parameters": parameters})


def drawn(space: dict, n: int, seed: int = 0) -> list[dict]:
    """`n` configurations as a study's trials draw them (Optuna's random sampler, in memory)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(suggest(trial, space))
        study.tell(trial, 0.0)
    return configs


def test_shipped_space_is_the_reports_and_gives_valid_params(raw_params):
    space = load_space(ROOT / "sweep.yaml")
    check_space(space, raw_params)
    assert set(space["model.filter_pattern"].values) >= {"uniform", "doubling", "halving", "bottleneck"}
    assert space["model.kernel_size"].values == (3, 5, 7)
    assert space["model.dropout"].values == (0.0, 0.2, 0.3)
    assert space["model.batch_norm"].values == (True, False)
    assert space["model.activation"].values == ("ReLU", "GELU", "SiLU", "Mish")
    assert space["train.learning_rate"] == Range(1e-5, 1e-3, log=True, integer=False)
    for config in drawn(space, 20):
        parse_params(with_overrides(raw_params, config))  # raises if any drawn value is invalid
        for key, value in config.items():
            spec = space[key]
            if isinstance(spec, Choice):
                assert value in spec.values and type(value) is type(spec.values[spec.values.index(value)])
            else:
                assert spec.low <= value <= spec.high


def test_each_entry_becomes_the_distribution_it_says(raw_params):
    space = space_of(
        {
            "train.learning_rate": {"min": 1.0e-5, "max": 1.0e-3, "log": True},
            "model.dense_neurons": {"min": 8, "max": 64},
            "model.num_filters": {"values": [[8, 16], [16, 32, 64]]},  # lists travel through Optuna as JSON
        }
    )
    study = optuna.create_study()
    trial = study.ask()
    config = suggest(trial, space)
    dists = trial.distributions
    assert dists["train.learning_rate"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["model.dense_neurons"] == optuna.distributions.IntDistribution(8, 64)
    assert config["model.num_filters"] in ([8, 16], [16, 32, 64])
    parse_params(with_overrides(raw_params, config))
    # A configuration fixed in advance (a retried trial's) comes back as the same values.
    study.enqueue_trial({"model.num_filters": "[16, 32, 64]", "train.learning_rate": 2e-4, "model.dense_neurons": 9})
    again = suggest(study.ask(), space)
    assert again == {"train.learning_rate": 2e-4, "model.dense_neurons": 9, "model.num_filters": [16, 32, 64]}


def test_a_grid_needs_values_for_every_key():
    assert grid_of(space_of({"model.kernel_size": {"values": [3, 5]}, "model.depth": {"min": 2, "max": 4}})) == {
        "model.kernel_size": [3, 5],
        "model.depth": [2, 3, 4],
    }
    with pytest.raises(UserError, match="--sampler grid needs a list of values for every key; model.dropout is a"):
        grid_of(space_of({"model.dropout": {"min": 0.0, "max": 0.3}}))


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


def test_sweep_queue_says_what_replaced_it(tmp_path: Path):
    result = run_cli(tmp_path, "sweep", "queue", "--n", "3", "--seed", "0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: `inatpipe sweep queue` is now `inatpipe sweep run --sampler random --trials N` (the same sweep.yaml; "
        "each trial runs as a DVC experiment straight away); see docs/sweeps.md"
    )


@pytest.mark.parametrize(
    ("args", "space", "message"),
    [
        (["--sampler", "bayes"], None, "--sampler 'bayes' is not one of tpe, random, grid"),
        (["--pruner", "wilcoxon"], None, "--pruner 'wilcoxon' is not one of median, asha, hyperband, none"),
        (
            [],
            "parameters:\n  model.kernal_size: {values: [3, 5]}\n",
            "sweep.yaml: model.kernal_size is not a key of params.yaml (did you mean model.kernel_size?)",
        ),
        (
            [],
            "parameters:\n  model.kernel_size: {values: [3, 5]}\n  train.learning_rate: {min: 1.0e-3, max: 1.0e-5}\n",
            "sweep.yaml: train.learning_rate: min (0.001) is greater than max (1e-05)",
        ),
        ([], "parameters:\n  sweep.trial: {values: [1, 2]}\n", "sweep.yaml: sweep.trial is set by `sweep run`"),
        (["--sampler", "grid"], None, "--sampler grid needs a list of values for every key; train.learning_rate"),
        (["--trials", "0"], None, "--trials must be at least 1, got 0"),
        (["--study", "a b"], None, "--study 'a b': use letters, digits"),
        (
            ["--storage", "postgresql://sweeper:secret@127.0.0.1:9/optuna"],
            None,
            "cannot open the study storage postgresql+psycopg://sweeper:***@127.0.0.1:9/optuna: ",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_and_exit_2(tmp_path: Path, args, space, message):
    p = Project(tmp_path)
    p.env["PYTHONPATH"] = str(ROOT / "src")
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "sweep.yaml").write_text(space or (ROOT / "sweep.yaml").read_text())
    p.git("init", "-q")
    p.git("add", "-A")
    p.git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "project")
    before = sorted(f.relative_to(tmp_path) for f in tmp_path.rglob("*") if ".git" not in f.parts)
    result = run_cli(tmp_path, "sweep", "run", "--trials", "2", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "secret" not in result.stderr
    after = sorted(f.relative_to(tmp_path) for f in tmp_path.rglob("*") if ".git" not in f.parts)
    assert after == before  # no study database, no logs: nothing started


def test_report_without_finished_experiments_is_one_line_and_exit_2(tmp_path: Path):
    p = Project(tmp_path)
    p.env["PYTHONPATH"] = str(ROOT / "src")  # an empty project: the library comes from this checkout
    p.git("init", "-q")
    p.dvc("init", "-q")
    p.git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "empty")
    result = inatpipe(tmp_path, "sweep", "report")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no finished experiments to rank; run some with")
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


def test_workers_sharing_a_sqlite_study_never_take_the_same_queued_trial(tmp_path: Path):
    """Queued trials (retries of a lost worker's, or enqueued configurations) are taken by whichever worker asks
    first; on SQLite, which has no row locks, two workers asking at once must still get two different trials."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="q", storage=storage, direction="maximize")
    for i in range(24):
        study.enqueue_trial({"x": i})
    start, taken = threading.Barrier(4), []

    def worker() -> None:
        own = optuna.load_study(study_name="q", storage=open_storage(url))  # a worker of its own, as in sweep run
        start.wait()
        for _ in range(6):
            taken.append(own.ask().number)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(24))  # each queued trial taken once, none twice


def test_a_dead_temp_run_without_its_executor_file_is_cleared_and_live_ones_stay(tmp_path: Path):
    """What a sweep worker killed mid-trial can leave: run/<rev>/<rev>.json of a dead process and no <rev>.run."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    runs = tmp_path / TEMP_RUNS
    for name, pid, executor in (("dead", int(dead.stdout), False), ("live", os.getpid(), False), ("done", 1, True)):
        (runs / name).mkdir(parents=True)
        (runs / name / f"{name}.json").write_text(json.dumps({"pid": pid}))
        if executor:
            (runs / name / f"{name}.run").write_text("{}")
    assert clear_dead_temp_runs(tmp_path) == ["dead"]
    assert sorted(p.name for p in runs.iterdir()) == ["done", "live"]
    assert clear_dead_temp_runs(tmp_path / "elsewhere") == []
