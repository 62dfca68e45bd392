"""Every stage's ``main`` turns a params or data error into one line on stderr and exit code 1.

One test per stage with a bad param (or, for make_data which has no params, bad data), in process
for speed, plus one real ``python -m experiments.train`` subprocess to prove the ``__main__`` wiring
passes the exit code on and prints no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from config.paths import REPO_ROOT


def _bad_params(tmp_path: Path, dotted: str, value: object) -> Path:
    """params.yaml of the repo with one key set to a bad value."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _one_line(capsys: pytest.CaptureFixture[str], stage: str, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{stage}: ") and needle in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _prepare(p: Path, tmp: Path) -> int:
    from experiments import prepare

    return prepare.main(["--params", str(p), "--out", str(tmp / "ds"), "--report", str(tmp / "r.json")])


def _train(p: Path, tmp: Path) -> int:
    from experiments import train

    return train.main(["padim", "--params", str(p), "--dataset", str(tmp / "ds"), "--out", str(tmp / "m")])


def _evaluate(p: Path, tmp: Path) -> int:
    from experiments import evaluate

    args = ["padim", "--params", str(p), "--dataset", str(tmp), "--models", str(tmp), "--out", str(tmp / "e")]
    return evaluate.main([*args, "--no-mlflow"])


def _select(p: Path, tmp: Path) -> int:
    from registry import select

    return select.main(["--params", str(p), "--eval-dir", str(tmp / "e"), "--out-dir", str(tmp / "r")])


def _promote(p: Path, tmp: Path) -> int:
    from registry import promote

    return promote.main(["--params", str(p), "--out", str(tmp / "model"), "--eval-dir", str(tmp / "e")])


STAGES: list[tuple[str, Callable[[Path, Path], int], str, object, str]] = [
    ("prepare", _prepare, "data.max_train", "many", "data.max_train"),
    ("train", _train, "models.padim.n_features", -3, "n_features"),
    ("evaluate", _evaluate, "evaluate.latency_repeats", 0, "evaluate.latency_repeats"),
    ("select", _select, "registry.model_name", "", "registry.model_name"),
    ("promote", _promote, "registry.alias", "", "registry.alias"),
]


@pytest.mark.parametrize(("stage", "run", "key", "value", "needle"), STAGES, ids=[s[0] for s in STAGES])
def test_bad_param_is_one_line_and_exit_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stage: str,
    run: Callable[[Path, Path], int],
    key: str,
    value: object,
    needle: str,
) -> None:
    params = _bad_params(tmp_path, key, value)
    capsys.readouterr()
    assert run(params, tmp_path) == 1
    _one_line(capsys, stage, needle)


def test_unreadable_params_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    for stage, run, *_ in STAGES:
        capsys.readouterr()
        assert run(bad, tmp_path) == 1, stage
        _one_line(capsys, stage, "invalid YAML")


def test_make_data_bad_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from experiments import make_data

    blocker = tmp_path / "file"
    blocker.write_text("a file where the data folder's parent should be")
    capsys.readouterr()
    assert make_data.main(["--out", str(blocker / "data"), "--limit", "1"]) == 1
    _one_line(capsys, "make_data", str(blocker))


def test_stage_subprocess_exits_1_without_traceback(tmp_path: Path) -> None:
    params = _bad_params(tmp_path, "models.padim.layers", ["no_such_layer"])
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "padim", "--params", str(params), "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: ") and "layers" in lines[0], proc.stderr
