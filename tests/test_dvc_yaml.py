"""dvc.yaml is honest: each stage lists as deps exactly the library files its entry module imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

SRC = ROOT / "src"


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


def imported_library_files(script: Path) -> set[str]:
    """Library modules (paths relative to the project) that importing the stage script loads."""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('stage', {str(script)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps([m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    files = {Path(f).resolve() for f in json.loads(out)}
    return {
        f.relative_to(ROOT).as_posix() for f in files if f.is_relative_to(SRC / "inatpipe") and f.name != "__init__.py"
    }


def declared_library_files(deps: list[str]) -> set[str]:
    files = set()
    for dep in deps:
        path = ROOT / dep
        if dep.startswith("src/"):
            found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            files |= {f.relative_to(ROOT).as_posix() for f in found if f.name != "__init__.py"}
    return files


def entry_module(cmd: str) -> str:
    """The script of `python stages/x.py`, or of `torchrun --nproc_per_node=N stages/x.py` (several GPUs)."""
    return next(word for word in cmd.split() if word.endswith(".py"))


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_are_exactly_its_imports(name):
    stage = stages()[name]
    script = entry_module(stage["cmd"])
    assert script in stage["deps"], f"{name} must depend on its own entry module {script}"
    assert declared_library_files(stage["deps"]) == imported_library_files(ROOT / script)


def test_every_stage_module_has_a_stage():
    declared = {entry_module(stage["cmd"]) for stage in stages().values()}
    assert declared == {p.relative_to(ROOT).as_posix() for p in (ROOT / "stages").glob("*.py")}
