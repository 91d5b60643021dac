"""dvc.yaml is honest: each stage declares exactly the library files it imports, the params it reads and the data
it opens, so that DVC reruns a stage when, and only when, something it uses changed.

Imports are read statically from the source (every `import`, also inside functions); params and opened files are
recorded while the in-process pipeline runs each stage (tests/stages.py).
"""

from __future__ import annotations

import pytest
import yaml

from inatpipe.dvc_cli import stage_spec
from inatpipe.params import read_raw
from inatpipe.testing import STAGES

from .conftest import ROOT, Pipeline
from .imports import library_closure

pytestmark = pytest.mark.xdist_group("pipeline")  # its costly fixtures are built once, on one worker

PACKAGE = ROOT / "src" / "inatpipe"


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


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
    assert declared_library_files(stage["deps"]) == library_closure(ROOT / script)


def test_every_stage_module_has_a_stage():
    declared = {entry_module(stage["cmd"]) for stage in stages().values()}
    assert declared == {p.relative_to(ROOT).as_posix() for p in (ROOT / "stages").glob("*.py")}


def test_the_static_import_closure_sees_lazy_and_package_imports():
    """The checks above rest on this reading of imports: it follows `from pkg import module`, imports inside
    functions, and the package __init__ files an import runs."""
    closure = library_closure(ROOT / "stages" / "train_flexible.py")
    assert "src/inatpipe/training/distributed.py" in closure  # `from inatpipe.training import distributed`
    assert "src/inatpipe/params/recipe.py" in closure  # through params/__init__.py
    assert "src/inatpipe/data/sample.py" in library_closure(PACKAGE / "data" / "setup.py")
    assert "src/inatpipe/evaluation/predict.py" in library_closure(PACKAGE / "cli.py")  # inside a function


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(f"{d}.") for d in declared)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_reads_exactly_the_params_it_declares(pipeline: Pipeline, stage: str):
    """Every key read is declared (else a change would not rerun the stage), and every declared key is read (else
    a change would rerun it for nothing); a declared section must have at least one of its keys read."""
    declared = stage_spec(stage, read_raw(pipeline.root / "params.yaml"), ROOT / "dvc.yaml")["params"]
    read = pipeline.records[stage].params
    assert read, f"{stage} read no params at all: the recording is broken"
    assert sorted(k for k in read if not covered(k, declared)) == [], f"{stage} reads params dvc.yaml doesn't list"
    assert [d for d in declared if not any(covered(k, [d]) for k in read)] == [], f"{stage} declares unread params"


def _outputs(spec: dict) -> list[str]:
    outs = []
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            outs.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return outs


def _under(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f"{f.rstrip('/')}/") for f in folders)


# Read by every stage without being data: its params, dvc.yaml (a resume state's fingerprint), and its code.
NOT_DATA = ["params.yaml", "dvc.yaml", "src", "stages", ".resume"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_opens_exactly_the_data_it_declares(pipeline: Pipeline, stage: str):
    """Every file a stage reads is a declared dep (or its own output); every declared data dep is read."""
    spec = stage_spec(stage, read_raw(pipeline.root / "params.yaml"), ROOT / "dvc.yaml")
    data_deps = [d for d in spec["deps"] if not _under(d, NOT_DATA)]
    files = {f for f in pipeline.records[stage].read if (pipeline.root / f).is_file()}
    data_read = {f for f in files if not _under(f, NOT_DATA + _outputs(spec))}
    assert sorted(f for f in data_read if not _under(f, data_deps)) == [], f"{stage} reads undeclared data"
    assert [d for d in data_deps if not any(_under(f, [d]) for f in data_read)] == [], f"{stage}: unread deps"
