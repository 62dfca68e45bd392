"""Every project module a DVC stage imports is one of that stage's deps.

A module missing from ``deps`` breaks "same code + data + params -> same outputs": edit it and
``dvc repro`` calls the stage up to date while the outputs came from the old code. The check
follows imports (module-level and inside functions) transitively through the project's packages.
"""

from __future__ import annotations

import pytest
import yaml

from tools.dvc_yaml import code_deps
from tools.imports import REPO, module_file


def stage_files(module: str) -> set[str]:
    """Repo-relative files of the project modules ``module`` runs (package ``__init__``s left out)."""
    return set(code_deps(module))


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
    """build_model imports the model classes inside functions (PatchCore's is experiments.coreset);
    those must be followed too."""
    found = stage_files("experiments.evaluate")
    assert {"experiments/coreset.py", "core/scoring.py", "core/preprocess.py"} <= found


def test_stages_do_not_depend_on_code_they_do_not_run() -> None:
    """evaluate does not rerun for an edit of the train script, nor prepare for the models' code."""
    assert "experiments/train.py" not in stage_files("experiments.evaluate")
    prepare = stage_files("experiments.prepare")
    assert not prepare & {"experiments/coreset.py", "experiments/metrics.py", "experiments/models.py"}


@pytest.mark.parametrize(("stage", "module", "deps"), _stages(), ids=[s[0] for s in _stages()])
def test_every_imported_project_module_is_a_dep(stage: str, module: str, deps: list[str]) -> None:
    assert module_file(module) is not None, f"{stage}: {module} is not a project module"
    imported = stage_files(module)
    missing = sorted(imported - set(deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in deps"
