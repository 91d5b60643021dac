"""Sweeps end to end: a DVC grid and `inatpipe sweep queue` experiments run by `dvc queue start -j 2`, then ranked.

One temporary git + DVC project with tiny data; each experiment runs only train_flexible (the random ones also
evaluate@flexible) for one epoch, so the whole module costs about a minute on 2 idle cores.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time

import pytest
import yaml
from PIL import Image

from inatpipe.filter_patterns import expand_filters
from inatpipe.params import read_raw
from inatpipe.sweep import parse_space, sample_configs

from .project import SMALL_PARAMS, Project, make_project

pytestmark = pytest.mark.slow

TARGETS = ("train_flexible", "evaluate@flexible")
SPACE = {
    "parameters": {
        "model.filter_pattern": {"values": ["uniform", "halving", "bottleneck"]},
        "model.base_filters": {"values": [4, 8]},
        "model.depth": {"values": [2, 3]},
        "model.activation": {"values": ["ReLU", "GELU", "SiLU", "Mish"]},
        "train.learning_rate": {"min": 1.0e-4, "max": 1.0e-2, "log": True},
    }
}
VAL_METRIC = "metrics/train_flexible/metrics.json:best.val_accuracy"
FINISHED = ("success", "failed")


def experiments(p: Project) -> dict[str, dict]:
    """name -> {state, params, metrics} from `dvc exp show --json`, for the experiments of HEAD."""
    out = {}
    for commit in json.loads(p.dvc("exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0].get("data") or {}
            metrics = {path: m.get("data") for path, m in (data.get("metrics") or {}).items()}
            out[exp["name"]] = {
                "state": (exp.get("executor") or {}).get("state"),
                "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data"),
                "metrics": metrics,
            }
    return out


def workers_exited(p: Project) -> bool:
    """Whether the workers `dvc queue start` spawned have all exited; read from their state files, as polling
    `dvc queue status` would itself take CPU from the experiments."""
    files = list((p.root / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"))
    return bool(files) and all(json.loads(f.read_text()).get("returncode") is not None for f in files)


def wait_for_queue(p: Project, names: set[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if workers_exited(p) and all(experiments(p).get(n, {}).get("state") in FINISHED for n in names):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not finish within {timeout} s:\n{p.dvc('queue', 'status').stdout}")
        time.sleep(2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Project:
    """Two grid, two random and one failing experiment run with -j 2; then one more queued but never started."""
    p = make_project(
        tmp_path_factory.mktemp("sweep"), {**SMALL_PARAMS, "train": {**SMALL_PARAMS["train"], "epochs": 1}}
    )
    (p.root / "sweep.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    p.dvc("repro", *TARGETS)
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline results")
    try:
        # The grid trains only: its experiments keep the baseline's test metrics, which the report must not show.
        p.dvc("exp", "run", "--queue", "train_flexible", "-S", "model.kernel_size=5,7")
        p.queue_output = p.inatpipe(
            "sweep", "queue", "--n", "2", "--seed", "3", "--name", "rs", *(f"--stage={t}" for t in TARGETS)
        ).stdout
        p.dvc("exp", "run", "--queue", "-n", "broken", "train_flexible", "-S", "model.kernel_size=4")
        queued = {name for name, e in experiments(p).items() if e["state"] == "queued"}
        p.grid = queued - {"rs-01", "rs-02", "broken"}  # DVC names grid points itself
        p.dvc("queue", "start", "-j", "2")
        wait_for_queue(p, queued)
        p.dvc("exp", "run", "--queue", "-n", "pending", *TARGETS, "-S", "model.dropout=0.1")
        p.exps = experiments(p)
        yield p
    finally:
        p.dvc("queue", "remove", "--queued", check=False)
        p.dvc("queue", "stop", "--kill", check=False)


def test_grid_and_random_experiments_appear_with_their_own_params_and_metrics(sweep: Project):
    exps = sweep.exps
    assert len(sweep.grid) == 2
    assert {exps[n]["params"]["model"]["kernel_size"] for n in sweep.grid} == {5, 7}
    space = parse_space(SPACE)
    expected = sample_configs(space, read_raw(sweep.root / "params.yaml"), n=2, seed=3)
    for name, config in zip(("rs-01", "rs-02"), expected, strict=True):
        params = exps[name]["params"]
        for key, value in config.items():
            section, leaf = key.split(".")
            assert params[section][leaf] == pytest.approx(value), (name, key)
        # The stage expanded the pattern and recorded the list it trained.
        model = params["model"]
        filters = expand_filters(model["filter_pattern"], model["base_filters"], model["depth"])
        recorded = exps[name]["metrics"]["metrics/train_flexible/metrics.json"]["num_filters"]
        assert recorded == ",".join(map(str, filters))
        assert f"{name}: dvc exp run --queue -n {name} train_flexible evaluate@flexible -S" in sweep.queue_output
        assert 0 <= exps[name]["metrics"]["metrics/evaluate/flexible/metrics.json"]["test"]["accuracy"] <= 1
    losses = set()
    for name in sweep.grid | {"rs-01", "rs-02"}:
        assert exps[name]["state"] == "success"
        train = exps[name]["metrics"]["metrics/train_flexible/metrics.json"]
        assert 0 <= train["best"]["val_accuracy"] <= 1 and train["train_seconds"] > 0
        losses.add(train["train"]["loss"])
    assert len(losses) == 4  # four different runs, not one result copied four times
    assert exps["broken"]["state"] == "failed"
    assert exps["pending"]["state"] == "queued"


def test_side_by_side_experiments_share_the_cores(sweep: Project):
    # Queued first, the grid experiments start together; rs-01 starts while the other worker is still busy.
    logs = "".join(sweep.dvc("queue", "logs", name).stdout for name in ("rs-01", min(sweep.grid)))
    assert re.search(r"torch threads: \d+ \(\d+ cores shared by 2 queue workers\)", logs), logs[-2000:]


def test_exp_show_sorts_by_validation_accuracy(sweep: Project):
    table = sweep.dvc("exp", "show", "--csv", "--sort-by", VAL_METRIC, "--sort-order", "desc").stdout
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["Experiment"] in sweep.grid | {"rs-01", "rs-02"}]
    scores = [float(r["best.val_accuracy"]) for r in rows]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)


def test_report_ranks_finished_experiments_and_names_the_rest(sweep: Project):
    result = sweep.inatpipe("sweep", "report", "--out", "reports/sweep")
    assert "left out: " in result.stdout
    assert "broken (failed)" in result.stdout and "pending (queued)" in result.stdout
    out = sweep.root / "reports" / "sweep"
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    names = [row.split("|")[2].strip() for row in rows]
    assert sorted(names) == sorted(sweep.grid | {"rs-01", "rs-02"})
    exps = sweep.exps

    def best(name):
        return exps[name]["metrics"]["metrics/train_flexible/metrics.json"]["best"]

    assert names == sorted(names, key=lambda n: (-best(n)["val_accuracy"], best(n)["val_loss"], n))
    test_column = {row.split("|")[2].strip(): row.split("|")[-3].strip() for row in rows}
    assert all(test_column[n] == "–" for n in sweep.grid)  # their test metrics scored the baseline's checkpoint
    assert all(0 <= float(test_column[n]) <= 1 for n in ("rs-01", "rs-02"))
    header = report.splitlines()[4]
    for column in ("model.kernel_size", "model.filter_pattern", "train.learning_rate", "test_accuracy"):
        assert column in header
    assert f"dvc exp apply {names[0]}" in report and "dvc exp run -S " in report
    assert "- broken: failed" in report and "- pending: queued" in report
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"parallel_coordinates.png", "val_accuracy_by_model.kernel_size.png"}
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300
        assert f"]({png.name})" in report
