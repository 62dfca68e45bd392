"""Every project module a DVC stage imports is one of that stage's deps.

A module missing from ``deps`` breaks "same code + data + params -> same outputs": edit it and
``dvc repro`` calls the stage up to date while the outputs came from the old code. The check
follows imports (module-level and inside functions) transitively through the project's packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("experiments", "registry", "serving")


def _module_file(name: str) -> Path | None:
    """``experiments.train`` -> experiments/train.py (or a package's __init__.py) when it is ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: Path) -> set[Path]:
    """Project files ``path`` imports, directly or through other project files."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                found = _module_file(name)
                if found is not None and found not in seen:
                    todo.append(found)
    return {p for p in seen if p.name != "__init__.py"}


def _stages() -> list[tuple[str, str, list[str]]]:
    """(stage, its ``python -m`` module, its deps) for every stage of dvc.yaml."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    stages = []
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        if words[:2] != ["python", "-m"]:
            continue
        deps = [d.replace("${key}", "x") for d in body.get("deps", [])]
        stages.append((name, words[2], deps))
    return stages


def test_the_check_sees_through_function_level_imports() -> None:
    """evaluate imports anomalib-side helpers inside functions; those must be followed too."""
    found = {p.relative_to(REPO).as_posix() for p in project_imports(REPO / "experiments" / "evaluate.py")}
    assert {"experiments/train.py", "serving/scoring.py", "serving/preprocess.py"} <= found


@pytest.mark.parametrize(("stage", "module", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_every_imported_project_module_is_a_dep(stage: str, module: str, deps: list[str]) -> None:
    entry = _module_file(module)
    assert entry is not None, f"{stage}: {module} is not a project module"
    imported = {p.relative_to(REPO).as_posix() for p in project_imports(entry)}
    missing = sorted(imported - set(deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in deps"
