"""Sweeps end to end: `inatpipe sweep queue` experiments and a failing one run by `dvc queue start -j 2`, then ranked.

One temporary git + DVC project with tiny data; each experiment runs only train_flexible, for one epoch. (How the
report reads an experiment that evaluated its own checkpoint is tested on `dvc exp show` output in test_sweep.py.)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from inatpipe.params import read_raw
from inatpipe.params.filters import expand_filters
from inatpipe.sweep.space import parse_space, sample_configs

from . import stages
from .project import SMALL_PARAMS, Project, make_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_queue")]  # its fixtures: built once, on one worker

TARGETS = ("train_flexible", "evaluate@flexible")
RANDOM = ("rs-01", "rs-02")
SPACE = {
    "parameters": {
        "model.filter_pattern": {"values": ["uniform", "halving", "bottleneck"]},
        "model.base_filters": {"values": [4, 8]},
        "model.depth": {"values": [2, 3]},
        "model.activation": {"values": ["ReLU", "GELU", "SiLU", "Mish"]},
        "train.learning_rate": {"min": 1.0e-4, "max": 1.0e-2, "log": True},
    }
}
LOSS_METRIC = "metrics/train_flexible/metrics.json:train.loss"
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


RUNNING = 2  # DVC's TaskStatus.RUNNING, in the executor info file of each experiment the queue runs


def running(p: Project) -> set[str]:
    """The experiments running right now, read from the info files DVC's queue keeps of them (cheap to poll, unlike
    `dvc queue status`, which would take CPU from the experiments)."""
    names = set()
    for info in (p.root / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(info.read_text())
            if data.get("status") == RUNNING:
                names.add(data.get("name") or info.stem)
    return names


def wait_for_queue(p: Project, names: set[str], timeout: float = 300) -> list[set[str]]:
    """Poll until every experiment in `names` has finished; returns which ran together, sample by sample."""
    deadline = time.monotonic() + timeout
    together = []
    while True:
        together.append(running(p))
        if workers_exited(p):
            states = {n: experiments(p).get(n, {}).get("state") for n in names}
            assert all(state in FINISHED for state in states.values()), states  # no worker left to finish them
            return together
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue did not finish within {timeout} s:\n{p.dvc('queue', 'status').stdout}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Project:
    """Two random experiments and a failing one run with -j 2; then one more queued but never started."""
    p = make_project(
        tmp_path_factory.mktemp("sweep"), {**SMALL_PARAMS, "train": {**SMALL_PARAMS["train"], "epochs": 1}}
    )
    (p.root / "sweep.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    for stage in ("split", "prepare", "stats", *TARGETS):  # the baseline, run here and recorded as dvc repro would
        stages.run(p.root, stage)
    p.dvc("commit", "--force", "--with-deps", *TARGETS)
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline results")
    try:
        # They train only: they keep the baseline's test metrics, which the report must not show as theirs.
        p.queue_output = p.inatpipe(
            "sweep", "queue", "--n", "2", "--seed", "3", "--name", "rs", "--stage", "train_flexible"
        ).stdout
        p.dvc("exp", "run", "--queue", "-n", "broken", "train_flexible", "-S", "model.kernel_size=4")
        queued = {*RANDOM, "broken"}
        # Its workers are daemons that keep the output pipes of `dvc queue start` open while they run: with the
        # output elsewhere, the command returns at once and the queue can be watched as it runs.
        cmd = [sys.executable, "-m", "dvc", "queue", "start", "-j", "2"]
        subprocess.run(cmd, cwd=p.root, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        p.together = wait_for_queue(p, queued)
        p.dvc("exp", "run", "--queue", "-n", "pending", *TARGETS, "-S", "model.dropout=0.1")
        p.exps = experiments(p)
        yield p
    finally:
        p.dvc("queue", "remove", "--queued", check=False)
        p.dvc("queue", "stop", "--kill", check=False)


def test_random_experiments_appear_with_their_own_params_and_metrics(sweep: Project):
    exps = sweep.exps
    space = parse_space(SPACE)
    expected = sample_configs(space, read_raw(sweep.root / "params.yaml"), n=2, seed=3)
    for name, config in zip(RANDOM, expected, strict=True):
        params = exps[name]["params"]
        for key, value in config.items():
            section, leaf = key.split(".")
            assert params[section][leaf] == pytest.approx(value), (name, key)
        # The stage expanded the pattern and recorded the list it trained.
        model = params["model"]
        filters = expand_filters(model["filter_pattern"], model["base_filters"], model["depth"])
        recorded = exps[name]["metrics"]["metrics/train_flexible/metrics.json"]["num_filters"]
        assert recorded == ",".join(map(str, filters))
        assert f"{name}: dvc exp run --queue -n {name} train_flexible -S" in sweep.queue_output
    losses = set()
    for name in RANDOM:
        assert exps[name]["state"] == "success"
        train = exps[name]["metrics"]["metrics/train_flexible/metrics.json"]
        assert 0 <= train["best"]["val_accuracy"] <= 1 and train["train_seconds"] > 0
        losses.add(train["train"]["loss"])
    assert len(losses) == 2  # two different runs, not one result copied twice
    assert exps["broken"]["state"] == "failed"
    assert exps["pending"]["state"] == "queued"


def test_two_experiments_ran_at_once_sharing_the_cores(sweep: Project):
    seen = set().union(*sweep.together)
    assert seen >= set(RANDOM), seen  # the polling saw every experiment run
    assert any(len(names) == 2 for names in sweep.together), sweep.together  # -j 2: two at the same time
    # Each took its share of the cores while both ran.
    cores = os.cpu_count() if not hasattr(os, "sched_getaffinity") else len(os.sched_getaffinity(0))
    logs = sweep.dvc("queue", "logs", "rs-01").stdout
    assert f"torch threads: {max(1, cores // 2)} ({cores} cores shared by 2 queue workers)" in logs


def test_exp_show_sorts_by_a_metric(sweep: Project):
    """Sorted by the final training loss, which no two experiments share (validation accuracy on 7 images ties):
    the order DVC prints must be the one the values give."""
    table = sweep.dvc("exp", "show", "--csv", "--sort-by", LOSS_METRIC, "--sort-order", "asc").stdout
    rows = [r for r in csv.DictReader(io.StringIO(table)) if r["Experiment"] in RANDOM]
    losses = [float(r["train.loss"]) for r in rows]
    assert len(losses) == 2 and len(set(losses)) == 2, "tied values would make any order pass"
    assert losses == sorted(losses)
    by_name = {n: sweep.exps[n]["metrics"]["metrics/train_flexible/metrics.json"]["train"]["loss"] for n in RANDOM}
    assert [r["Experiment"] for r in rows] == sorted(by_name, key=by_name.get)


def test_report_ranks_finished_experiments_and_names_the_rest(sweep: Project):
    result = sweep.inatpipe("sweep", "report", "--out", "reports/sweep")
    assert "left out: " in result.stdout
    assert "broken (failed)" in result.stdout and "pending (queued)" in result.stdout
    out = sweep.root / "reports" / "sweep"
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    names = [row.split("|")[2].strip() for row in rows]
    assert sorted(names) == list(RANDOM)
    exps = sweep.exps

    def best(name):
        return exps[name]["metrics"]["metrics/train_flexible/metrics.json"]["best"]

    assert names == sorted(names, key=lambda n: (-best(n)["val_accuracy"], best(n)["val_loss"], n))
    test_column = {row.split("|")[2].strip(): row.split("|")[-3].strip() for row in rows}
    assert all(test_column[n] == "–" for n in RANDOM)  # their test metrics scored the baseline's checkpoint
    header = report.splitlines()[4]
    configs = sample_configs(parse_space(SPACE), read_raw(sweep.root / "params.yaml"), n=2, seed=3)
    varying = [key for key in configs[0] if configs[0][key] != configs[1][key]]
    assert varying and all(column in header for column in [*varying, "test_accuracy"]), header
    assert f"dvc exp apply {names[0]}" in report and "dvc exp run -S " in report
    assert "- broken: failed" in report and "- pending: queued" in report
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"parallel_coordinates.png", *(f"val_accuracy_by_{key}.png" for key in varying)}
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 300
        assert f"]({png.name})" in report
