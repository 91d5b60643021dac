"""Workers on several machines: one study in a real PostgreSQL server, two clones of the project drawing trials
from it at the same time, each pushing its experiments to a shared git remote (their outputs to a shared DVC
remote), and a third clone that pulls them all and reports on the whole study.

The server is a throwaway cluster (initdb / pg_ctl) in a temporary folder, reached on a Unix socket only. As root
(CI), it runs as the `postgres` user Debian's package creates, since PostgreSQL refuses to run as root. Skipped
with the reason where PostgreSQL is not installed (`apt-get install postgresql`; `.ci/run` installs it, and with CI
set the test fails instead).
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import multiprocessing.synchronize
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from . import stages
from .project import SMALL_PARAMS, Project, make_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep_postgres")]

STUDY = "pg"
TRIALS = 2
SPACE = {"parameters": {"train.learning_rate": {"min": 1.0e-3, "max": 3.0e-2, "log": True}}}
RUN = ("sweep", "run", "--study", STUDY, "--trials", str(TRIALS), "--sampler", "random", "--pruner", "none")


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Server:
    """A running throwaway PostgreSQL server, reached on a Unix socket."""

    def __init__(self, run, bin_dir: Path, socket: Path):
        self.run, self.bin_dir, self.socket = run, bin_dir, socket

    def new_database(self, name: str) -> str:
        """An empty database; its URL."""
        self.run(str(self.bin_dir / "createdb"), "-h", str(self.socket), "-U", "postgres", name)
        return f"postgresql://postgres@/{name}?host={self.socket}"


@pytest.fixture(scope="module")
def postgres() -> Server:
    """A running PostgreSQL server for this module's tests."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        missing = "PostgreSQL is not installed: apt-get install postgresql (.ci/run installs it)"
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(missing)  # CI runs every test
    as_owner: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="inatpipe-pg-"))  # not under pytest's tmp: the server's user must enter
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user to run PostgreSQL as (apt-get install postgresql)")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, socket = folder / "data", folder
    ctl = [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data)]

    def run(*cmd: str) -> None:
        result = subprocess.run([*as_owner, *cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = f"-k {socket} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        run(*ctl[len(as_owner) :], "-o", options, "-l", str(folder / "server.log"), "-w", "start")
        yield Server(run, bin_dir, socket)
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def clone(remote: Path, dest: Path) -> Project:
    subprocess.run(["git", "clone", "-q", str(remote), str(dest)], check=True, capture_output=True)
    p = Project(dest)
    p.git("config", "user.name", "worker")
    p.git("config", "user.email", "worker@example.com")
    return p


@pytest.fixture(scope="module")
def machines(tmp_path_factory, postgres: Server) -> dict[str, Project]:
    url = postgres.new_database("optuna")
    base = tmp_path_factory.mktemp("machines")
    remote = base / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
    origin = make_project(base / "origin", {**SMALL_PARAMS, "train": {**SMALL_PARAMS["train"], "epochs": 2}})
    (origin.root / "sweep.yaml").write_text(yaml.safe_dump(SPACE))
    for stage in ("split", "prepare", "stats"):
        stages.run(origin.root, stage)
    origin.dvc("commit", "--force", "--with-deps", "stats")
    origin.dvc("remote", "add", "-d", "shared", str(base / "dvc-remote"))
    origin.git("add", "-A")
    origin.git("commit", "-qm", "baseline")
    origin.git("remote", "add", "origin", str(remote))
    origin.git("push", "-q", "origin", "HEAD")
    origin.dvc("push", "-q")

    a, b = (clone(remote, base / name) for name in ("a", "b"))
    for worker in (a, b):
        worker.dvc("pull", "-q", "--with-deps", "stats")  # the data and what the trials start from, as a new machine
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "inatpipe.cli", *RUN, "--storage", url],
            cwd=w.root,
            env=w.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (a, b)
    ]
    try:
        for w, proc in zip((a, b), workers, strict=True):
            w.out, w.err = proc.communicate(timeout=600)
            assert proc.returncode == 0, w.err
    finally:
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    c = clone(remote, base / "c")
    c.pulled = c.dvc("exp", "pull", "origin")
    c.report = c.inatpipe("sweep", "report", "--study", STUDY, "--storage", url, "--out", "reports/sweep")
    return {"a": a, "b": b, "c": c, "url": url}


def test_two_machines_share_one_study_and_run_each_trial_once(machines):
    study = optuna.load_study(
        study_name=STUDY, storage=machines["url"].replace("postgresql://", "postgresql+psycopg://")
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * TRIALS
    ran = {name: {log.stem for log in (machines[name].root / ".sweep" / "logs").glob("*.log")} for name in "ab"}
    assert ran["a"] and ran["b"], ran  # both machines took part
    assert not ran["a"] & ran["b"]  # no trial ran on both
    assert ran["a"] | ran["b"] == {f"{STUDY}-{t.number:03d}" for t in trials}
    assert all(t.user_attrs["pushed"] for t in trials)


def test_a_third_clone_pulls_every_trial_and_reports_on_the_whole_study(machines):
    c = machines["c"]
    report = (c.root / "reports" / "sweep" / "report.md").read_text()
    for number in range(TRIALS):
        assert f"| {STUDY}-{number:03d} " in report
    assert "## Left out" not in report  # every finished trial's experiment is here
    assert f"ranked {TRIALS} experiments" in c.report.stdout
    # The experiments came with their outputs: each trial's checkpoint is in this clone's cache, from the DVC remote.
    for commit in json.loads(c.dvc("exp", "show", "--json").stdout):
        for exp in commit.get("experiments") or []:
            digest = exp["revs"][0]["data"]["outs"]["models/flexible.pt"]["hash"]
            assert (c.root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]).is_file(), exp["name"]


def _open(url: str, start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    from inatpipe.sweep.study import open_storage, storage_url

    start.wait()  # all at the same moment, as workers launched together on several machines
    try:
        open_storage(storage_url(url, Path.cwd()), heartbeat_s=5)
        results.put("opened")
    except Exception as e:
        results.put(str(e))


def test_workers_starting_together_on_a_new_database_all_open_it(postgres: Server):
    """Optuna creates its tables on first use; workers started at the same moment race to do it (PostgreSQL then
    reports a duplicate key in its catalogue), and each must still get the storage."""
    url = postgres.new_database("fresh")
    context = multiprocessing.get_context("fork")  # forked: optuna is imported once, here
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_open, args=(url, start, results)) for _ in range(4)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join()
    assert outcomes == ["opened"] * 4
