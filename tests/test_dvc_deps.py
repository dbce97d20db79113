"""dvc.yaml cannot drift from the imports: every fedcxr module a stage script loads (directly or
through other modules) is covered by one of that stage's deps, so editing it reruns the stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _module_file(name: str) -> Path | None:
    """The file of fedcxr module `name` (a package's __init__.py), or None if not one."""
    base = SRC / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """fedcxr modules (and the stage helper _common) that `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("fedcxr", "_common")}


def closure(script: Path) -> set[Path]:
    """Every file of the repository that `script` loads, itself included."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            if name == "_common":
                todo.append(REPO / "stages" / "_common.py")
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a submodule loads its packages' __init__ too
                found = _module_file(".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return {p.relative_to(REPO) for p in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> Path:
    words = stage["cmd"].split()
    assert words[0] == "python" and words[1].startswith("stages/"), stage["cmd"]
    return REPO / words[1]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_every_module_the_script_loads(name: str) -> None:
    stage = _stages()[name]
    deps = [Path(d) for d in stage.get("deps", []) if "${" not in str(d)]
    uncovered = sorted(
        str(path)
        for path in closure(_script(stage))
        if not any(path == dep or dep in path.parents for dep in deps)
    )
    assert not uncovered, f"dvc.yaml stage {name!r} does not list {uncovered} in its deps"


def test_the_closure_follows_imports_through_modules() -> None:
    files = closure(REPO / "stages" / "train_federated.py")
    # train_federated -> fedcxr.federation.runner -> fedcxr.federation.state -> resume
    assert Path("src/fedcxr/federation/resume.py") in files
    assert Path("src/fedcxr/tensorfile.py") in files
    assert Path("stages/_common.py") in files
