"""An Optuna study as `inatpipe sweep` keeps it: where it is stored, and the sampler and pruner it searches with.

Optuna does the searching (TPE, random or grid sampling), the pruning (median or Hyperband, from the per-epoch
validation accuracy each trial reports) and the coordination of workers: any number of processes, on any number of
machines, draw trials from one study kept in a database or a journal file. This module only turns the command
line's names into Optuna's objects, and a storage failure into one line.

Storage URLs:
    (none)                          sqlite:///<project>/.sweep/optuna.db, one machine, nothing to install
    sqlite:///path/to/file.db       a SQLite file (relative paths: from the project root)
    postgresql://user:pw@host/db    PostgreSQL (or mysql://...), for workers on several machines
    journal:///path/to/file.log     an Optuna journal file, e.g. on a disk the machines share
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from inatpipe.errors import UserError

STUDY_DIR = Path(".sweep")  # ignored by git: the default study database and the trials' logs
DEFAULT_DB = STUDY_DIR / "optuna.db"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "asha", "hyperband", "none")
DEFAULT_STUDY = "sweep"
# A SQLite file is shared by the worker threads and every trial's training process; wait for its lock this long.
SQLITE_TIMEOUT_S = 60


def storage_url(given: str | None, root: Path) -> str:
    """The storage URL to use, with file paths made absolute: each trial runs in a temporary copy of the project."""
    if not given:
        return f"sqlite:///{(root / DEFAULT_DB).resolve()}"
    for scheme in ("sqlite:///", "journal:///"):
        if given.startswith(scheme):
            path = Path(given[len(scheme) :])
            return f"{scheme}{path if path.is_absolute() else (root / path).resolve()}"
    if given.startswith("journal:"):
        raise UserError(f"--storage {given!r}: write a journal file as journal:///path/to/file.log")
    if given.startswith(("postgresql://", "postgres://")):  # the driver installed with the project: psycopg 3
        return "postgresql+psycopg://" + given.split("://", 1)[1]
    return given


def shown(url: str) -> str:
    """The URL with any password hidden, for messages."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """The storage at `url`. With `heartbeat_s`, a worker's running trials beat every that many seconds, and a trial
    whose worker stopped beating for 3x as long is failed and its configuration queued again (databases only:
    Optuna's journal files keep no heartbeats)."""
    quiet_optuna()
    try:
        if url.startswith("journal:///"):
            path = Path(url[len("journal://") :])
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.journal.JournalStorage(backend)
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        if heartbeat_s:
            kwargs |= {
                "heartbeat_interval": heartbeat_s,
                "grace_period": 3 * heartbeat_s,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            }
        storage = _rdb_storage(url, kwargs)
        if url.startswith("sqlite"):
            _serialize_sqlite_transactions(storage)
        return storage
    except (ImportError, ModuleNotFoundError):
        raise UserError(
            f"--storage {shown(url)}: its database driver is not installed; install it (`pip install "
            "psycopg[binary]` for postgresql://, `pip install pymysql` and mysql+pymysql:// for MySQL)"
        ) from None
    except Exception as e:  # sqlalchemy's errors, a bad URL, a journal file that can't be written
        raise UserError(f"cannot open the study storage {shown(url)}: {_first_line(e)}") from None


# Workers started together on a new database race to create Optuna's tables; the losers see the winner's tables
# half made ("duplicate key value ... pg_type", "already exists") and succeed on a second try.
_CREATION_RACE = ("duplicate key value", "already exists")
CREATION_TRIES = 5


def _rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    for attempt in range(1, CREATION_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:
            if attempt == CREATION_TRIES or not any(s in str(e) for s in _CREATION_RACE):
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _serialize_sqlite_transactions(storage: optuna.storages.RDBStorage) -> None:
    """Make every transaction on a SQLite study take the database's write lock as it begins (BEGIN IMMEDIATE).

    SQLite has no row locks: two workers popping the same queued trial (a retry, an enqueued configuration) both
    read it as WAITING and both mark it RUNNING, and run it twice. With the lock taken at BEGIN, the second reads
    it as RUNNING and takes the next one, across threads and processes alike. (Servers lock the row instead.)
    """
    import sqlalchemy

    engine = storage.engine

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN would be DEFERRED

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(getattr(e, "orig", None) or e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def quiet_optuna() -> None:
    """Optuna logs every trial (and a failed one's traceback); `sweep run` prints its own one line per trial."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Heartbeats and their retry callback are marked experimental; they are what lets workers on many machines
    # recover a lost worker's trial, and the docs say so once.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("alembic").setLevel(logging.ERROR)


def make_sampler(
    name: str, seed: int | None, startup_trials: int, grid: dict[str, list] | None = None
) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=seed)
    raise UserError(f"--sampler {name!r} is not one of {', '.join(SAMPLERS)}")


def make_pruner(name: str, startup_trials: int, max_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner, judging the validation accuracy each trial reports after every epoch (an epoch is a step).

    median: stop a trial whose accuracy after an epoch is below the median of the earlier trials' at that epoch,
    once `startup_trials` trials have finished and from epoch 2 on (epoch 1 is mostly warm-up).
    asha: asynchronous successive halving, rungs at epochs 1, 4, 16, ...: a trial goes past a rung only while its
    accuracy there is in the top quarter of the trials that reached it (the first to reach a rung always goes on).
    Factor 4 rather than 3: with TPE most later trials are good ones, and factor 3 let so many of them through
    that TPE + ASHA trained 0.52x random search's epochs (benchmarks/sweep_search.py, docs/benchmarks.md).
    hyperband: successive halving over brackets of 1 to `max_epochs` epochs, growing by 3x.
    """
    if name == "median":
        # A step is an epoch, numbered from 1; no step below n_warmup_steps is judged: epoch 1 never is.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=2)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4, min_early_stopping_rate=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"--pruner {name!r} is not one of {', '.join(PRUNERS)}")


@dataclass(frozen=True)
class StudySettings:
    """What a study is searched with, recorded in the study itself so that every worker, and every trial's
    training process judging its own epochs, uses the same."""

    space: dict[str, Any]  # sweep.yaml's parameters, as written
    sampler: str
    pruner: str
    startup_trials: int
    max_epochs: int

    def as_attrs(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "startup_trials": self.startup_trials,
            "max_epochs": self.max_epochs,
        }

    @classmethod
    def of(cls, study: optuna.Study) -> StudySettings | None:
        attrs = study.user_attrs
        if "pruner" not in attrs:
            return None
        return cls(attrs["space"], attrs["sampler"], attrs["pruner"], attrs["startup_trials"], attrs["max_epochs"])

    def pruner_object(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.pruner, self.startup_trials, self.max_epochs)


def load_study(name: str, storage: optuna.storages.BaseStorage, url: str) -> optuna.Study:
    """An existing study, or one line saying which exist."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        known = f"; it holds: {', '.join(names)}" if names else "; it holds no study yet"
        raise UserError(f"no study {name!r} in {shown(url)}{known}") from None
