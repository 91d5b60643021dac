"""The project's own import graph, read statically from the source: every `import` of an inatpipe module, also
inside functions, and the package __init__ files an import runs. The dvc.yaml and layering tests rest on it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "inatpipe"


def module_file(name: str) -> Path | None:
    """The file of module `name` (inatpipe.x.y) in this checkout, or None for anything outside the package."""
    if name != "inatpipe" and not name.startswith("inatpipe."):
        return None
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, parents: bool = True) -> set[str]:
    """inatpipe modules that `path` imports anywhere in it, with (`parents`) the packages whose __init__ an import
    of a module inside them runs first."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1 if parents else len(parts), len(parts) + 1):  # a.b.c runs a/__init__, a/b/__init__ first
            if module_file(".".join(parts[:i])) is not None:
                found.add(".".join(parts[:i]))
    if not parents:  # `from pkg import name`: pkg stands for the import only when name is no module of it
        found -= {name.rsplit(".", 1)[0] for name in found if name.rsplit(".", 1)[0] in found}
    return found


def library_closure(script: Path) -> set[str]:
    """Every library file (relative to the project) that running `script` may import, __init__ files left out."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name))
    files = {module_file(name) for name in seen}
    return {f.relative_to(ROOT).as_posix() for f in files if f.name != "__init__.py"}


def library_modules() -> list[str]:
    """Every module of the package, by dotted name (a package by its own name, for its __init__)."""
    names = []
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names
