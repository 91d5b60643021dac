"""DVC as the library meets it: running `dvc` (failures as UserError), reading which of the queue workers that
`dvc queue start -j N` spawned are still alive, and reading what dvc.yaml declares a stage depends on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from inatpipe.errors import UserError
from inatpipe.params import lookup

# `dvc queue start -j N` spawns N celery workers, each recorded in this folder of the project that queued them
# (DVC_ROOT) as <name>.json holding its pid and, once it has exited, its return code.
QUEUE_WORKERS = Path(".dvc") / "tmp" / "exps" / "celery"


def run_dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc <args>` in the current directory; with `check`, a failure is one line naming the command and DVC's error."""
    # `python -m dvc` with this interpreter: the DVC installed beside this package, whatever PATH says.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=True)
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {last[0]}")
    return result


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def queue_workers(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> int:
    """How many DVC queue workers run side by side with this process; 0 when it does not run under `dvc queue`.

    A queued experiment runs in a temporary copy under <project>/.dvc/tmp/exps/, with DVC_ROOT naming the
    project; the queue's live workers are the ones `dvc queue start -j N` started that have not exited yet,
    so the last experiments of a sweep, running alone, get the whole machine.
    """
    root = environ.get("DVC_ROOT")
    if not root or "DVC_EXP_NAME" not in environ:
        return 0
    cwd = (cwd or Path.cwd()).resolve()
    if not cwd.is_relative_to((Path(root) / ".dvc" / "tmp" / "exps").resolve()):
        return 0  # `dvc exp run` in the workspace itself, not a queue worker's copy
    live = 0
    for info in (Path(root) / QUEUE_WORKERS).glob("*.json"):
        try:
            worker = json.loads(info.read_text())
        except (OSError, ValueError):  # a worker writing its file right now
            continue
        if isinstance(worker, dict) and worker.get("returncode") is None and _alive(int(worker.get("pid", 0) or 0)):
            live += 1
    return max(live, 1)


DVC_YAML = Path("dvc.yaml")
_VARIABLE = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")


def stage_spec(stage: str, raw_params: dict, dvc_yaml: Path = DVC_YAML) -> dict:
    """`stage` as dvc.yaml declares it (`name@item` for an item of a foreach stage), with `${item}` and `${key}`
    (a params.yaml key) filled in wherever they appear."""
    if not dvc_yaml.is_file():
        raise UserError(f"{dvc_yaml} not found; run the stage from the project root, where dvc.yaml lives")
    name, _, item = stage.partition("@")
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {}
    if name not in stages:
        raise UserError(f"{dvc_yaml} has no stage {name!r}")
    spec = stages[name].get("do", stages[name])

    def fill(text: str) -> str:
        return _VARIABLE.sub(lambda m: item if m.group(1) == "item" else str(lookup(raw_params, m.group(1))), text)

    def filled(node):
        if isinstance(node, str):
            return fill(node)
        if isinstance(node, list):
            return [filled(v) for v in node]
        if isinstance(node, dict):
            return {fill(str(k)): filled(v) for k, v in node.items()}
        return node

    return filled(spec)


def stage_inputs(stage: str, raw_params: dict, dvc_yaml: Path = DVC_YAML) -> tuple[list[str], list[str]]:
    """What dvc.yaml declares `stage` depends on: (deps, params keys)."""
    spec = stage_spec(stage, raw_params, dvc_yaml)
    return list(spec.get("deps") or []), [str(key) for key in spec.get("params") or []]


# Where DVC keeps a running `dvc exp run --temp`: run/<rev>/ holds <rev>.json (its process) and <rev>.run (its
# executor). A run killed with SIGKILL after DVC removed the .run file leaves the folder behind, and every later
# `dvc exp show` then fails reading that missing file.
TEMP_RUNS = Path(".dvc/tmp/exps/standalone/run")


def clear_dead_temp_runs(root: Path = Path(".")) -> list[str]:
    """Remove the folders of temporary experiments that lost their executor file and whose process is gone (what a
    sweep worker killed mid-trial can leave); returns their names. Live or starting runs are left alone."""
    cleared = []
    folder = root / TEMP_RUNS
    for run in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (run / f"{run.name}.run").exists() or _recorded_process_alive(run / f"{run.name}.json"):
            continue
        shutil.rmtree(run, ignore_errors=True)
        cleared.append(run.name)
    return cleared


def _recorded_process_alive(process_file: Path) -> bool:
    """Whether the process a DVC process-info file (<rev>.json) names is still running."""
    try:
        pid = json.loads(process_file.read_text()).get("pid")
    except (OSError, ValueError):
        return False
    return isinstance(pid, int) and _alive(pid)
