"""`inatpipe sweep run` end to end on a SQLite study: trials as DVC experiments, pruning, a killed worker, a
second run continuing the study, and the study's report.

One temporary git + DVC project with tiny data, its upstream stages committed once. The study is seeded with two
configurations (as a user would enqueue a known one): a learning rate that learns, then one that cannot, which the
median pruner stops after epoch 2. A second `sweep run -j 2` is killed (the whole process tree, as a lost machine)
while two trials run; a third run fails their stale trials and reaches the budget with a retry.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

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
RUN = ("sweep", "run", "--study", STUDY, "--pruner", "median", "--startup-trials", "1", "--heartbeat", "1")


def experiments(p: Project) -> dict[str, dict]:
    """name -> {params, metrics} from `dvc exp show --json`, for the experiments of HEAD."""
    out = {}
    for commit in json.loads(p.dvc("exp", "show", "--json").stdout):
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


def running_trial_logs(p: Project, n: int, proc: subprocess.Popen, timeout: float = 180) -> list[str]:
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
    seeded.enqueue_trial({"train.learning_rate": BAD, "model.dense_neurons": 32})
    p.first = p.inatpipe(*RUN, "--trials", "2", "--seed", "0")

    # Two trials at once, killed with everything they started once both experiments run; then the same study again.
    p.before_kill = {f"{STUDY}-000", f"{STUDY}-001"}
    cmd = [sys.executable, "-m", "inatpipe.cli", *RUN, "--trials", "4", "-j", "2", "--seed", "1"]
    proc = subprocess.Popen(cmd, cwd=p.root, env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.killed = running_trial_logs(p, 2, proc)
        p.running_at_kill = [t.number for t in trials(p) if t.state == TrialState.RUNNING]
    finally:
        kill_tree(proc.pid)
        proc.wait()
    p.restart = p.inatpipe(*RUN, "--trials", "3", "--seed", "2")

    # The pruned configuration, run again as a plain experiment.
    bad = next(t for t in trials(p) if t.state == TrialState.PRUNED)
    p.pruned_number = bad.number
    overrides = [f"{k}={v}" for k, v in bad.params.items()]
    p.dvc("exp", "run", "-n", "rerun", "train_flexible", *[a for o in overrides for a in ("-S", o)])
    p.exps = experiments(p)
    p.report = p.inatpipe("sweep", "report", "--study", STUDY, "--out", "reports/sweep")
    return p


def test_each_finished_trial_is_a_dvc_experiment_that_agrees_with_the_study(study: Project):
    finished = [t for t in trials(study) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
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
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(train["best"]["val_accuracy"]) and len(curve) == EPOCHS
    assert "trial 0 (s1-000): val accuracy" in study.first.stdout
    assert "study s1: 2 finished (1 complete, 1 pruned), 0 failed" in study.first.stdout


def test_a_pruned_trial_stops_early_keeps_its_results_and_never_stands_in_for_a_full_run(study: Project):
    pruned = next(t for t in trials(study) if t.number == study.pruned_number)
    assert pruned.number == 1 and pruned.params["train.learning_rate"] == BAD
    k = pruned.user_attrs["pruned_at_epoch"]
    assert 2 <= k < EPOCHS  # the pruner judges from epoch 2 (epoch 1 is warm-up)
    exp = study.exps[f"{STUDY}-001"]
    train = exp["metrics"][TRAIN_METRICS]
    assert train["stop"] == {"epoch": k, "reason": "pruned"} and train["step"] == k
    assert f"trial 1 (s1-001): pruned after epoch {k}" in study.first.stdout
    # The same hyperparameters later, outside the study: trained in full, not restored from the run cache.
    rerun = study.exps["rerun"]["metrics"][TRAIN_METRICS]
    assert rerun["stop"] == {"epoch": EPOCHS, "reason": "completed"}
    assert study.exps["rerun"]["params"]["sweep"] == {"study": "", "trial": -1}


def test_a_killed_worker_leaves_no_trial_running_and_its_configuration_is_retried(study: Project):
    assert len(study.running_at_kill) == 2  # -j 2: two trials ran at once when the worker was lost
    by_number = {t.number: t for t in trials(study)}
    assert not [t for t in by_number.values() if t.state == TrialState.RUNNING]
    for number in study.running_at_kill:
        assert by_number[number].state == TrialState.FAIL
    retried = [t for t in by_number.values() if t.system_attrs.get("failed_trial") in study.running_at_kill]
    assert retried and all(t.params == by_number[t.system_attrs["failed_trial"]].params for t in retried)
    assert any(t.state == TrialState.COMPLETE for t in retried)  # the run after the restart trained one of them
    finished = [t for t in by_number.values() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    assert "study s1: 3 finished" in study.restart.stdout


def test_the_study_report_ranks_its_trials_and_draws_the_search(study: Project):
    out = study.root / "reports" / "sweep"
    report = (out / "report.md").read_text()
    finished = [t for t in trials(study) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for t in finished:
        assert f"| {STUDY}-{t.number:03d} " in report
    assert "rerun" not in report  # not a trial of the study
    assert f"pruned @ {study.exps[f'{STUDY}-001']['metrics'][TRAIN_METRICS]['stop']['epoch']}" in report
    retried = {t.system_attrs["failed_trial"]: t.number for t in trials(study) if "failed_trial" in t.system_attrs}
    for number in study.running_at_kill:
        line = f"- {STUDY}-{number:03d}: failed: its worker stopped beating (killed or lost); retried as trial"
        assert f"{line} {retried[number]}" in report
    assert "sampler tpe, pruner median; 2 complete, 1 pruned" in report
    for image in ("optimization_history.png", "learning_curves.png", "param_importances.png"):
        assert (out / image).stat().st_size > 5000 and f"]({image})" in report
    top = max(t.value for t in finished if t.state == TrialState.COMPLETE)
    best = report.split("## Best run: ")[1].split("\n")[0]  # ties on accuracy go to the lower validation loss
    assert best in {f"{STUDY}-{t.number:03d}" for t in finished if t.value == top and t.state == TrialState.COMPLETE}
    assert f"dvc exp branch {best} " in report
    assert "sweep.trial" not in report.split("## Best run")[1]  # its rerun command is a plain run
