"""The library's layers only point down, and nothing imports in a circle; the stages and commands that need no
torch (split, compare, `inatpipe sweep`) never load it."""

from __future__ import annotations

import subprocess
import sys

from .imports import ROOT, imported_modules, library_modules, module_file

# Lowest first. A module may import from its own layer or below, never above: a change in a layer touches only the
# layers above it. Every module of the package is placed here (a new one joins the layer its imports allow).
LAYERS = (
    ("errors", "paths", "atomic", "cores", "startup"),  # no torch, and no inatpipe import beyond this layer
    ("params", "torchfile"),  # params: no torch, so split, compare and the sweep commands start fast
    ("dvc_cli", "data", "runtime"),
    ("models",),
    ("checkpoint",),
    ("training",),
    ("evaluation", "sweep"),
    ("serve",),  # the web app: FastAPI over evaluation's predictions and Grad-CAM
    ("cli", "testing"),
)
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}


def group(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def graph() -> dict[str, set[str]]:
    return {m: imported_modules(module_file(m), parents=False) - {m} for m in library_modules() if "." in m}


def test_every_module_has_a_layer():
    assert sorted({group(m) for m in library_modules() if "." in m} - set(RANK)) == []


def test_imports_only_point_down():
    upward = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if "." in b and RANK[group(b)] > RANK[group(a)]
    ]
    assert upward == []


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can see one


# Python source that defines import_stages(names): the stage scripts' modules, imported as `python stages/x.py` does
IMPORT_STAGES = (
    "import importlib.util\n"
    "def import_stages(names):\n"
    "    for stage in names:\n"
    "        spec = importlib.util.spec_from_file_location(stage, f'stages/{stage}.py')\n"
    "        spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    "import_stages"
)


def run_snippet(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python at the project root, with the library on its path."""
    env = {"PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)


def test_split_compare_and_the_sweep_commands_never_load_torch(tmp_path):
    code = (
        "import sys\n"
        f"{IMPORT_STAGES}(('split', 'compare'))\n"
        "import inatpipe.sweep.report, inatpipe.sweep.study_plots\n"
        "from inatpipe.cli import main\n"
        "try:\n"
        "    main(['sweep', 'run', '--sampler', 'grid'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    result = run_snippet(code)
    assert result.stdout.splitlines()[-1] == "no torch", result.stdout + result.stderr
    # The command got as far as reading sweep.yaml (whose ranges a grid can't take), with its modules loaded.
    assert "error: --sampler grid needs a list of values for every key" in result.stderr


def test_flexible_cnn_stages_with_shipped_params_never_load_torchvision_or_torch_dynamo():
    """Importing torchvision loads torch._dynamo (seconds per process), and so does torch.use_deterministic_algorithms
    (through torch._inductor.config): the FlexibleCNN stages, with the shipped params (basic policy, no mixing),
    import, seed and build their training transforms and mixer without either, their kernels deterministic all the
    same. (A torch optimizer still loads torch._dynamo at its construction; the stages that train pay that once.)"""
    code = (
        "import sys, torch\n"
        f"{IMPORT_STAGES}(('stats', 'train_flexible', 'evaluate', 'export'))\n"
        "from inatpipe.data.transforms import training_transform\n"
        "from inatpipe.params import load_params\n"
        "from inatpipe.runtime import seed_everything\n"
        "from inatpipe.training.mixing import batch_mixer\n"
        "p = load_params()\n"
        "seed_everything(p.seed)\n"
        "x = training_transform(p.data)(torch.zeros(2, 3, 40, 40, dtype=torch.uint8))\n"
        "assert batch_mixer(p.train, 3) is None and x.shape[-1] == p.data.image_size\n"
        "heavy = sorted(m for m in ('torchvision', 'torch._dynamo', 'torch._inductor.config') if m in sys.modules)\n"
        "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),"
        " heavy)\n"
    )
    result = run_snippet(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "True True []", result.stdout
