"""`inatpipe sweep run` end to end on a SQLite study: trials as DVC experiments, pruning, a killed worker, a
second run continuing the study, and the study's report.

One temporary git + DVC project with tiny data, its upstream stages committed once. Configurations are enqueued
in the study (as a user would seed a search with known ones): a first run trains one with a learning rate that
learns. A second run, `-j 2`, starts two more at once, the first with a rate that cannot learn, and is killed (the
whole process tree, as a lost machine). A third run fails their stale trials, retries the first of them, and the
median pruner stops that retry after epoch 2: the budget of 2 finished trials is reached.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from inatpipe.sweep.report import build_report

from . import stages
from .processes import kill_tree
from .project import SMALL_PARAMS, Project, make_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep_sqlite")]  # its fixture: built once, on one worker

STUDY = "s1"
EPOCHS = 4
GOOD, BAD = 2.0e-2, 1.0e-7
SPACE = {
    "parameters": {
        "train.learning_rate": {"min": BAD, "max": 3.0e-2, "log": True},
        "model.dense_neurons": {"values": [16, 32]},
    }
}
TRAIN_METRICS = "metrics/train_flexible/metrics.json"
# The shared options of every run: the median pruner judges from the first finished trial on; heartbeats every
# second, so a lost worker's trial is stale after 3.
HEARTBEAT_S = 1
RUN = ("sweep", "run", "--study", STUDY, "--pruner", "median", "--startup-trials", "1", "--heartbeat", str(HEARTBEAT_S))


def experiments(show: list[dict]) -> dict[str, dict]:
    """name -> {params, metrics} from `dvc exp show --json`, for the experiments of HEAD."""
    out = {}
    for commit in show:
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0].get("data") or {}
            out[exp["name"]] = {
                "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data"),
                "metrics": {path: m.get("data") for path, m in (data.get("metrics") or {}).items()},
                "plots": data.get("plots") or {},
            }
    return out


def trials(p: Project) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=p.storage).get_trials()


def started_trials(p: Project, n: int, proc: subprocess.Popen, timeout: float = 180) -> list[str]:
    """Wait until `n` trials' DVC experiments have started (their logs say so); returns those experiment names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        started = [
            log.stem
            for log in sorted((p.root / ".sweep" / "logs").glob(f"{STUDY}-*.log"))
            if "Reproducing experiment" in log.read_text(errors="replace") and log.stem not in p.before_kill
        ]
        if len(started) >= n:
            return started
        time.sleep(0.2)
    raise AssertionError(f"{n} trials did not start within {timeout} s")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Project:
    train = {**SMALL_PARAMS["train"], "epochs": EPOCHS, "learning_rate": GOOD}
    p = make_project(tmp_path_factory.mktemp("study"), {**SMALL_PARAMS, "train": train})
    (p.root / "sweep.yaml").write_text(yaml.safe_dump(SPACE, sort_keys=False))
    for stage in ("split", "prepare", "stats"):  # the trials' upstream, run here and recorded as dvc repro would
        stages.run(p.root, stage)
    p.dvc("commit", "--force", "--with-deps", "stats")
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline")
    p.storage = f"sqlite:///{p.root / '.sweep' / 'optuna.db'}"
    (p.root / ".sweep").mkdir()
    seeded = optuna.create_study(study_name=STUDY, storage=p.storage, direction="maximize")
    seeded.enqueue_trial({"train.learning_rate": GOOD, "model.dense_neurons": 32})
    p.first = p.inatpipe(*RUN, "--trials", "1", "--seed", "0")

    # Two trials at once, killed with everything they started once both experiments run; then the same study again.
    seeded.enqueue_trial({"train.learning_rate": BAD, "model.dense_neurons": 32})
    seeded.enqueue_trial({"train.learning_rate": GOOD / 2, "model.dense_neurons": 16})
    p.before_kill = {f"{STUDY}-000"}
    cmd = [sys.executable, "-m", "inatpipe.cli", *RUN, "--trials", "3", "-j", "2", "--seed", "1"]
    proc = subprocess.Popen(cmd, cwd=p.root, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.killed = started_trials(p, 2, proc)
        p.running_at_kill = [t.number for t in trials(p) if t.state == TrialState.RUNNING]
    finally:
        kill_tree(proc.pid)
        proc.wait()
    # Both lost trials' heartbeats stale (3 beats) before the restart looks: it then fails and retries them in the
    # order of their numbers, instead of one first while the other's last beat is still within the grace period.
    time.sleep(3 * HEARTBEAT_S + 0.5)
    p.restart = p.inatpipe(*RUN, "--trials", "2", "--seed", "2")

    # The pruned configuration, run again as a plain experiment.
    bad = next(t for t in trials(p) if t.state == TrialState.PRUNED)
    p.pruned_number = bad.number
    overrides = [f"{k}={v}" for k, v in bad.params.items()]
    p.dvc("exp", "run", "-n", "rerun", "train_flexible", *[a for o in overrides for a in ("-S", o)])
    show = json.loads(p.dvc("exp", "show", "--json").stdout)
    p.exps = experiments(show)
    # The report from the same `dvc exp show` (the command itself runs in test_sweep_postgres.py).
    with stages.inside(p.root):
        build_report(show, p.root / "reports" / "sweep", optuna.load_study(study_name=STUDY, storage=p.storage))
    return p


def test_each_finished_trial_is_a_dvc_experiment_that_agrees_with_the_study(study: Project):
    finished = [t for t in trials(study) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert [t.number for t in finished] == [0, 3], [(t.number, t.state.name, t.params) for t in trials(study)]
    for t in finished:
        name = f"{STUDY}-{t.number:03d}"
        assert t.user_attrs["experiment"] == name
        exp = study.exps[name]
        assert exp["params"]["sweep"] == {"study": STUDY, "trial": t.number}
        assert exp["params"]["train"]["learning_rate"] == pytest.approx(t.params["train.learning_rate"])
        assert exp["params"]["model"]["dense_neurons"] == t.params["model.dense_neurons"]
        train = exp["metrics"][TRAIN_METRICS]
        # The study's curve is the experiment's: one value per epoch, its best the objective.
        curve = [t.intermediate_values[e] for e in sorted(t.intermediate_values)]
        assert train["best"]["val_accuracy"] == pytest.approx(max(curve))
        assert train["stop"]["epoch"] == len(curve)
    complete = finished[0]
    assert complete.state == TrialState.COMPLETE and len(complete.intermediate_values) == EPOCHS
    assert complete.value == pytest.approx(study.exps[f"{STUDY}-000"]["metrics"][TRAIN_METRICS]["best"]["val_accuracy"])
    assert "trial 0 (s1-000): val accuracy" in study.first.stdout
    assert "study s1: 1 finished (1 complete, 0 pruned), 0 failed" in study.first.stdout


def test_a_pruned_trial_stops_early_keeps_its_results_and_never_stands_in_for_a_full_run(study: Project):
    pruned = next(t for t in trials(study) if t.number == study.pruned_number)
    assert pruned.number == 3 and pruned.params["train.learning_rate"] == BAD
    k = pruned.user_attrs["pruned_at_epoch"]
    assert 2 <= k < EPOCHS  # the pruner judges from epoch 2 (epoch 1 is warm-up)
    exp = study.exps[f"{STUDY}-003"]
    train = exp["metrics"][TRAIN_METRICS]
    assert train["stop"] == {"epoch": k, "reason": "pruned"} and train["step"] == k
    assert f"trial 3 (s1-003): pruned after epoch {k}" in study.restart.stdout
    # The same hyperparameters later, outside the study: trained in full, not restored from the run cache.
    rerun = study.exps["rerun"]["metrics"][TRAIN_METRICS]
    assert rerun["stop"] == {"epoch": EPOCHS, "reason": "completed"}
    assert study.exps["rerun"]["params"]["sweep"] == {"study": "", "trial": -1}


def test_a_killed_worker_leaves_no_trial_running_and_its_configuration_is_retried(study: Project):
    assert sorted(study.running_at_kill) == [1, 2]  # -j 2: two trials ran at once when the worker was lost
    assert sorted(study.killed) == ["s1-001", "s1-002"]
    by_number = {t.number: t for t in trials(study)}
    assert not [t for t in by_number.values() if t.state == TrialState.RUNNING]
    assert by_number[1].state == by_number[2].state == TrialState.FAIL
    # Both configurations were queued again; the restart ran the first, the second waits for a later run.
    retries = {t.system_attrs["failed_trial"]: t for t in by_number.values() if "failed_trial" in t.system_attrs}
    assert sorted(retries) == [1, 2]
    assert retries[1].number == 3 and retries[1].params == by_number[1].params
    assert retries[2].state == TrialState.WAITING and retries[2].params == by_number[2].params
    assert "study s1: 2 finished (1 complete, 1 pruned), 2 failed" in study.restart.stdout


def test_the_study_report_ranks_its_trials_and_draws_the_search(study: Project):
    out = study.root / "reports" / "sweep"
    report = (out / "report.md").read_text()
    rows = [line.split("|")[2].strip() for line in report.splitlines() if re.match(r"\|\s+\d+ \|", line)]
    assert rows == ["s1-000", "s1-003"]  # the complete trial first; not the rerun, no trial of the study
    assert f"pruned @ {study.exps['s1-003']['metrics'][TRAIN_METRICS]['stop']['epoch']}" in report
    for number, retry in ((1, 3), (2, 4)):
        line = f"- s1-00{number}: failed: its worker stopped beating (killed or lost); retried as trial {retry}"
        assert line in report
    assert "sampler tpe, pruner median; 1 complete, 1 pruned, 2 failed, 0 running" in report
    for image in ("optimization_history.png", "learning_curves.png"):
        assert (out / image).stat().st_size > 5000 and f"]({image})" in report
    assert "parameter importances need at least 2 complete trials, the study has 1" in report
    assert "## Best run: s1-000" in report and "dvc exp branch s1-000 " in report
    assert "sweep.trial" not in report.split("## Best run")[1]  # its rerun command is a plain run
