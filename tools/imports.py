"""The project modules a module imports, transitively: one walker for everything that needs it.

``tools.dvc_yaml`` writes each DVC stage's code deps from it (every module a stage runs is a dep, so
editing one reruns the stage); the tests use it to check that the Lambda image copies every serving
module the handler imports (tests/serving/test_dockerfile.py). Follows imports anywhere in a file,
including inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from config.paths import REPO_ROOT as REPO


def module_file(name: str) -> Path | None:
    """``experiments.train`` -> experiments/train.py, or a package's __init__.py; None if not in the repo."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(module: str, packages: tuple[str, ...]) -> set[str]:
    """Modules of ``packages`` that ``module`` imports, directly or through each other (plus itself)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        file = module_file(name)
        if file is None:
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] in packages]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import inside the package
                    base = ".".join(name.split(".")[: -node.level] + ([base] if base else []))
                if base.split(".")[0] not in packages:
                    continue
                todo.append(base)
                for alias in node.names:  # ``from serving import events`` imports a module
                    candidate = f"{base}.{alias.name}"
                    if module_file(candidate) is not None:
                        todo.append(candidate)
    return {name for name in seen if module_file(name) is not None}
