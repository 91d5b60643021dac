"""`inatpipe sweep run`: ask an Optuna study for trials and run each as a DVC experiment, J at a time, until the
study holds N finished trials.

Each worker thread loops: ask the study for a trial (Optuna's `study.optimize`, one trial at a time, which also
beats the trial's heartbeat and fails the stale trials of lost workers), run `dvc exp run --temp` with the trial's
params and its identity (sweep.study, sweep.trial), and tell the study the run's best validation accuracy — or that
the run was pruned, or failed. A finished experiment is pushed to the git remote when the project has one. Trials
are numbered by the study, so workers on other machines sharing its storage never run the same trial twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from tqdm import tqdm

from inatpipe.cores import THREADS_ENV, usable_cores
from inatpipe.dvc_cli import clear_dead_temp_runs, run_dvc
from inatpipe.errors import UserError
from inatpipe.params import parse_params, read_raw
from inatpipe.params.sweep import STUDY_NAME
from inatpipe.sweep.space import Choice, Range, Space, check_space, load_space, override_args, with_overrides
from inatpipe.sweep.study import (
    STUDY_DIR,
    StudySettings,
    make_sampler,
    open_storage,
    quiet_optuna,
    shown,
)
from inatpipe.sweep.trial import PRUNED_AT, STORAGE_ENV

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Stop rather than burn the budget on a broken setup: this many runs in a row failing on one worker (or this many
# configurations in a row that params.yaml rejects, which cost no run: a space mostly of invalid combinations).
MAX_FAILURES_IN_A_ROW = 3
MAX_INVALID_IN_A_ROW = 50
INVALID = "invalid"  # the user attribute of a trial whose configuration params.yaml rejects
POLL_S = 1.0
LOG_DIR = STUDY_DIR / "logs"


class TrialFailed(Exception):
    """The trial's DVC experiment failed; the message is the last line of its error."""


@dataclass(frozen=True)
class SweepRun:
    trials: int
    jobs: int
    study: str
    storage_url: str
    sampler: str
    pruner: str
    space_path: Path
    seed: int | None
    startup_trials: int
    heartbeat_s: int
    stages: tuple[str, ...]
    git_remote: str


# Optuna's categorical choices are None, bool, int, float or str; a list (say model.num_filters) travels as JSON.
def _encode(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _decode(spec: Choice, value: Any) -> Any:
    for choice in spec.values:
        if _encode(choice) == value:
            return choice
    return value


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """The trial's configuration: categorical for `values`, int or float (log scale with `log: true`) for ranges."""
    config: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, Choice):
            config[key] = _decode(spec, trial.suggest_categorical(key, [_encode(v) for v in spec.values]))
        elif spec.integer:
            config[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            config[key] = trial.suggest_float(key, float(spec.low), float(spec.high), log=spec.log)
    return config


GRID_MAX_INTS = 100  # an integer range becomes every integer in it, up to this many


def grid_of(space: Space) -> dict[str, list]:
    grid: dict[str, list] = {}
    for key, spec in space.items():
        if isinstance(spec, Choice):
            grid[key] = [_encode(v) for v in spec.values]
        elif isinstance(spec, Range) and spec.integer and not spec.log and spec.high - spec.low < GRID_MAX_INTS:
            grid[key] = list(range(int(spec.low), int(spec.high) + 1))
        else:
            raise UserError(
                f"--sampler grid needs a list of values for every key; {key} is a range: give it values: [...]"
            )
    return grid


def counts(study: optuna.Study) -> Counter:
    """How many of the study's trials are in each state."""
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def finished(c: Counter) -> int:
    return c[TrialState.COMPLETE] + c[TrialState.PRUNED]


def experiment_name(study: str, number: int) -> str:
    return f"{study}-{number:03d}"


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):  # the stage's own one-line error
            return line[len("error: ") :]
    return lines[-1] if lines else "no output"


def _git_remotes() -> list[str]:
    out = subprocess.run(["git", "remote"], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


class Sweep:
    """One `sweep run`: the study, the space, and the J worker threads running its trials."""

    def __init__(self, run: SweepRun, root: Path = Path(".")):
        self.run, self.root = run, root
        if run.trials < 1:
            raise UserError(f"--trials must be at least 1, got {run.trials}")
        if run.jobs < 1:
            raise UserError(f"-j must be at least 1, got {run.jobs}")
        if not STUDY_NAME.match(run.study):
            raise UserError(
                f"--study {run.study!r}: use letters, digits, '-', '_' or '.', starting with one of the first two"
            )
        if run.startup_trials < 0:
            raise UserError(f"--startup-trials must be at least 0, got {run.startup_trials}")
        if run.heartbeat_s < 1:
            raise UserError(f"--heartbeat must be at least 1 second, got {run.heartbeat_s}")
        make_sampler(run.sampler, run.seed, run.startup_trials, {})  # a bad name is one line before any work
        self.space = load_space(run.space_path)
        raw = read_raw(root / "params.yaml")
        self.base = parse_params(raw)  # a broken params.yaml is reported as itself, not as a bad space
        sweep_keys = [k for k in self.space if k.startswith("sweep.")]
        if sweep_keys:
            raise UserError(f"{run.space_path}: {sweep_keys[0]} is set by `sweep run` for each trial; remove it")
        check_space(self.space, raw, str(run.space_path))
        self.raw = raw
        self.grid = grid_of(self.space) if run.sampler == "grid" else None
        space_as_written = json.loads(json.dumps(yaml.safe_load(run.space_path.read_text())["parameters"]))
        self.settings = StudySettings(space_as_written, run.sampler, run.pruner, run.startup_trials, self._max_epochs())
        self.settings.pruner_object()  # a bad pruner name is one line before any work
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.processes: set[subprocess.Popen] = set()
        self.remote = run.git_remote if run.git_remote in _git_remotes() else None
        # Each trial's share of the cores, as `dvc queue start -j J` gives its experiments; INATPIPE_THREADS overrides.
        self.threads_per_trial = os.environ.get(THREADS_ENV) or str(max(1, usable_cores() // run.jobs))
        self.errors: list[BaseException] = []
        self.local = threading.local()  # each worker thread's current trial number

    def open(self) -> None:
        """Open the storage and create the study, or continue it."""
        self.storage = open_storage(self.run.storage_url, self.run.heartbeat_s)
        self.study = self._create_or_continue()

    def _max_epochs(self) -> int:
        """The longest run a trial may train: Hyperband's largest budget."""
        spec = self.space.get("train.epochs")
        candidates = [self.base.train.epochs]
        if isinstance(spec, Choice):
            candidates += [int(v) for v in spec.values]
        elif isinstance(spec, Range):
            candidates.append(int(spec.high))
        return max(candidates)

    def _create_or_continue(self) -> optuna.Study:
        run = self.run
        try:
            study = optuna.create_study(
                study_name=run.study, storage=self.storage, direction="maximize", load_if_exists=True
            )
        except Exception as e:
            raise UserError(
                f"cannot open study {run.study!r} in {shown(run.storage_url)}: {str(e).splitlines()[0]}"
            ) from None
        known = StudySettings.of(study)
        if known is None:
            for key, value in self.settings.as_attrs().items():
                study.set_user_attr(key, value)
        elif known != self.settings:
            differs = [k for k, v in self.settings.as_attrs().items() if known.as_attrs()[k] != v]
            raise UserError(
                f"study {run.study!r} was started with another {differs[0].replace('_', ' ')} "
                f"({known.as_attrs()[differs[0]]!r}); continue it with the same settings, or start another with "
                "--study NAME"
            )
        return study

    # --- counting ---------------------------------------------------------------------------------------------
    def counts(self) -> Counter:
        return counts(self.study)

    def finished(self) -> int:
        return finished(self.counts())

    # --- one trial --------------------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float:
        self.local.number = trial.number
        config = suggest(trial, self.space)
        name = experiment_name(self.run.study, trial.number)
        trial.set_user_attr("experiment", name)
        try:
            parse_params(with_overrides(self.raw, config))
        except UserError as e:
            trial.set_user_attr(INVALID, True)
            trial.set_user_attr("error", f"not a valid configuration: {e}")
            raise TrialFailed(f"not a valid configuration: {e}") from None
        args = [
            sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name, *self.run.stages,
            "-S", f"sweep.study={self.run.study}", "-S", f"sweep.trial={trial.number}", *override_args(config),
        ]  # fmt: skip
        env = {**os.environ, STORAGE_ENV: self.run.storage_url, THREADS_ENV: self.threads_per_trial}
        log_path = self.root / LOG_DIR / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(args, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            with self.lock:
                self.processes.add(proc)
            try:
                rc = proc.wait()
            finally:
                with self.lock:
                    self.processes.discard(proc)
        if rc != 0:
            line = _last_error_line(log_path.read_text(errors="replace"))
            trial.set_user_attr("error", line)
            raise TrialFailed(line)
        if self.remote:
            pushed = run_dvc("exp", "push", self.remote, name, check=False)
            trial.set_user_attr("pushed", pushed.returncode == 0)
            if pushed.returncode != 0:
                tqdm.write(
                    f"note: {name} not pushed to {self.remote}: {_last_error_line(pushed.stderr + pushed.stdout)}"
                )
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        values = frozen.intermediate_values
        if not values:
            raise TrialFailed("the run reported no epoch to the study (did it run train_flexible?)")
        if PRUNED_AT in frozen.user_attrs:
            raise optuna.TrialPruned(f"pruned after epoch {frozen.user_attrs[PRUNED_AT]}")
        return max(values.values())

    def say(self, trial: optuna.trial.FrozenTrial) -> None:
        name = trial.user_attrs.get("experiment", f"trial {trial.number}")
        if trial.state == TrialState.COMPLETE:
            what = f"val accuracy {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            what = f"pruned after epoch {trial.user_attrs.get(PRUNED_AT, '?')} (val accuracy {trial.value or 0:.4f})"
        else:
            what = f"failed: {trial.user_attrs.get('error', trial.state.name.lower())}"
        tqdm.write(f"trial {trial.number} ({name}): {what}")

    # --- workers ----------------------------------------------------------------------------------------------
    def worker(self, index: int) -> None:
        seed = None if self.run.seed is None else self.run.seed + index
        sampler = make_sampler(self.run.sampler, seed, self.run.startup_trials, self.grid)
        study = optuna.load_study(
            study_name=self.run.study, storage=self.storage, sampler=sampler, pruner=self.settings.pruner_object()
        )
        failures = invalid = 0
        try:
            while not self.stop.is_set():
                c = counts(study)
                done = finished(c)
                if done >= self.run.trials:
                    return
                if not c[TrialState.WAITING] and done + c[TrialState.RUNNING] >= self.run.trials:
                    # The last trials run elsewhere: wait for them, and fail those whose worker was lost (their
                    # configurations come back as WAITING trials, which this worker then runs).
                    optuna.storages.fail_stale_trials(study)
                    self.stop.wait(POLL_S)
                    continue
                if self.grid is not None and c[TrialState.WAITING] == 0 and self._grid_done(study):
                    return
                self.local.number = None
                study.optimize(self.objective, n_trials=1, catch=(TrialFailed,))
                if self.local.number is None:  # no trial was asked: another worker took the last one
                    continue
                trial = next(t for t in study.get_trials(deepcopy=False) if t.number == self.local.number)
                rejected = trial.user_attrs.get(INVALID, False)
                if not rejected:
                    self.say(trial)
                failed = trial.state == TrialState.FAIL
                failures = failures + 1 if failed and not rejected else 0
                invalid = invalid + 1 if rejected else 0
                if (failures >= MAX_FAILURES_IN_A_ROW or invalid >= MAX_INVALID_IN_A_ROW) and not self.stop.is_set():
                    raise UserError(
                        f"{max(failures, invalid)} trials in a row failed, the last with: "
                        f"{trial.user_attrs.get('error', '?')} (logs in {LOG_DIR}/)"
                    )
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which reports it
            self.errors.append(e)
            self.stop.set()

    def _grid_done(self, study: optuna.Study) -> bool:
        total = 1
        for values in (self.grid or {}).values():
            total *= len(values)
        return len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]) >= total

    def execute(self) -> Counter:
        """Run the workers until the study holds `trials` finished trials; Ctrl-C stops them and the running
        experiments (run the command again to continue)."""
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.run.jobs)]
        start = self.finished()
        bar = tqdm(
            total=self.run.trials, initial=min(start, self.run.trials), desc="trials", unit="trial", disable=None
        )
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=POLL_S)
                done = min(self.finished(), self.run.trials)
                bar.update(done - bar.n)
        except KeyboardInterrupt:
            self.stop.set()
            with self.lock:
                for proc in self.processes:
                    proc.terminate()
            for t in threads:
                t.join()
            raise
        finally:
            bar.close()
        for e in self.errors:
            raise e
        return self.counts()


def run_sweep(run: SweepRun) -> tuple[optuna.Study, Counter]:
    quiet_optuna()
    sweep = Sweep(run)  # checks the command line, sweep.yaml and params.yaml, and changes nothing
    if not (Path(".git").exists() and Path("dvc.yaml").is_file()):
        raise UserError("run `inatpipe sweep run` from the project root: a git repository with dvc.yaml")
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True).returncode != 0:
        raise UserError("the repository has no commit yet; DVC experiments start from a commit: commit first")
    clear_dead_temp_runs()  # a worker killed mid-trial may have left one that breaks `dvc exp show`
    sweep.open()
    counts = sweep.execute()
    return sweep.study, counts


def summary_lines(study: optuna.Study, c: Counter) -> list[str]:
    lines = [
        f"study {study.study_name}: {finished(c)} finished ({c[TrialState.COMPLETE]} complete, "
        f"{c[TrialState.PRUNED]} pruned), {c[TrialState.FAIL]} failed"
    ]
    try:
        best = study.best_trial
    except ValueError:
        return lines
    lines.append(
        f"best: trial {best.number} ({best.user_attrs.get('experiment')}), val accuracy {best.value:.4f}; "
        f"`inatpipe sweep report --study {study.study_name}` ranks them all"
    )
    return lines
