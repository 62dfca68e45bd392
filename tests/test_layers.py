"""The import graph between top-level packages runs one way: down to the torch-free core.

Why: the Lambda image and the edge agent copy ``core/`` (and the Lambda ``serving/``) without torch,
and a release or a development tool may drive anything below it but nothing below may reach up. A
new import that breaks the layering fails here with the file and the line, before it fails in an
image. See docs/architecture.md for what each layer is for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config.paths import REPO_ROOT

# What each top-level package may import from the project. Everything else is an upward or sideways
# arrow. The order of this dict is the order of the floors, ground floor first.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core"},  # params.yaml's types use core's definitions (e.g. the resize policies)
    "serving": {"core"},
    "edge": {"core", "serving"},
    "experiments": {"core", "config"},
    "registry": {"core", "config", "experiments"},
    "infra": {"config", "serving"},
    "release": {"core", "config", "serving", "edge", "infra", "registry"},
    "tools": {"core", "config", "serving", "edge", "experiments", "registry", "infra", "release"},
    "benchmarks": {
        "core",
        "config",
        "serving",
        "edge",
        "experiments",
        "registry",
        "infra",
        "release",
        "tools",
    },
}
PROJECT = set(ALLOWED) | {"tests"}
# Third-party packages the torch-free floors may not import (the Lambda and edge installs lack them).
HEAVY = {"torch", "torchvision", "anomalib", "lightning", "timm", "mlflow", "dvc", "openvino", "sklearn"}
TORCH_FREE = {"core", "serving", "edge"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(top-level name, line) of every import in a file, including those inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def _files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py")) if (REPO_ROOT / package).is_dir() else []


def test_the_allowed_graph_has_no_cycle() -> None:
    order = list(ALLOWED)
    for package, allowed in ALLOWED.items():
        below = set(order[: order.index(package)])
        assert allowed <= below, f"{package} may import {sorted(allowed - below)}, which stand above it"


@pytest.mark.parametrize("package", list(ALLOWED))
def test_no_import_runs_up_or_sideways(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in _files(package)
        for name, line in _imports(path)
        if name in PROJECT and name != package and name not in ALLOWED[package]
    ]
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: " + "; ".join(wrong)


@pytest.mark.parametrize("package", sorted(TORCH_FREE))
def test_torch_free_floors_import_no_training_stack(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name}"
        for path in _files(package)
        for name, line in _imports(path)
        if name in HEAVY
    ]
    assert not wrong, "; ".join(wrong)


def test_every_top_level_package_is_placed() -> None:
    """A new top-level package must take a floor here, or it escapes the check."""
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    assert packages - PROJECT == set(), f"add {sorted(packages - PROJECT)} to ALLOWED"
