"""Fixture: one real small ``dvc repro`` per test session, tracked by the team's MLflow server.

Trained once and read by every test that needs a real pipeline result (``tests/test_pipeline_e2e.py``
and ``tests/experiments/test_tracking_server.py``): the six models of ``params.yaml`` on a small
real subset of the embedded data (128 px, one epoch), every stage the real one (prepare → train@* →
evaluate@* → select → promote), run by ``dvc repro`` in a git+DVC copy of this repo whose only link to
the tracking server (PostgreSQL + S3 artifacts, ``tests/team_server.py``) is ``MLFLOW_TRACKING_URI``.

The shared run is read-only. Tests that change a pipeline (params edits, forced reruns, ``dvc exp
run``) take ``scratch_pipeline``: a copy of the finished run with its own registered-model name, so
nothing they do moves the shared run's files, dvc.lock or champion alias.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.paths import REPO_ROOT as REPO
from tools.mlflow_server import Stack

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")

SMALL = {
    "data": {
        "image_size": 128,
        "max_train": 48,
        "max_test_good": 16,
        "max_test_defect": 16,
        "max_val_good": 16,
    },
    "train": {"batch_size": 16},
    "evaluate": {"n_heatmaps": 2, "latency_repeats": 5},
}


@dataclass(frozen=True)
class Pipeline:
    """A finished ``dvc repro`` in ``work``; ``env`` is the environment it ran with."""

    work: Path
    env: dict[str, str]
    url: str  # the tracking server's URL (MLFLOW_TRACKING_URI in env)
    champion: dict[str, Any]  # build/registry/champion.json as select wrote it ({} in a scratch copy)
    params: dict[str, Any]  # the params.yaml the run used

    @property
    def models(self) -> list[str]:
        return list(self.params["models"])


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def small_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params.yaml`` shrunk to minutes on 2 CPUs: few images, 128 px, one epoch."""
    small = json.loads(json.dumps(SMALL))
    for name, model in params["models"].items():
        if "max_epochs" in model:
            small.setdefault("models", {}).setdefault(name, {})["max_epochs"] = 1
    # at 128 px SuperSimpleNet needs an earlier layer (its feature map must be >= 32x32)
    if "supersimplenet" in params["models"]:
        small.setdefault("models", {}).setdefault("supersimplenet", {})["layers"] = ["blocks.2"]
    return deep_update(params, small)


def copy_repo(work: Path) -> None:
    """This checkout's git-visible files (no serving/model, no dvc.lock) + data/ hard-linked."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, tracked.split("\0")):
        src = REPO / rel
        if src.is_file() and not rel.startswith("serving/model/") and rel != "dvc.lock":
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copytree(REPO / "data", work / "data", copy_function=os.link)


def pipeline_env(tracking_uri: str) -> dict[str, str]:
    """The stages' environment: the tracking URI is their only link to the server (no AWS keys)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        # Any attempt to reach the internet fails fast instead of hanging.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    return env


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="session")
def shared_pipeline(team_server: Stack, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A git+DVC copy of this repo with small params, after one full ``dvc repro`` via the server."""
    if not (REPO / "data" / "train" / "good").is_dir():
        pytest.fail("data/ is missing: run `make data` (part of `make test`) first")
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    copy_repo(work)
    params = small_params(_load_yaml(work / "params.yaml"))
    _write_yaml(work / "params.yaml", params)
    env = pipeline_env(team_server.url)
    run(["git", "init", "-q", "-b", "main"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "copy"], work, env)
    run([DVC, "repro"], work, env)
    champion = json.loads((work / "build" / "registry" / "champion.json").read_text())
    return Pipeline(work=work, env=env, url=team_server.url, champion=champion, params=params)


@pytest.fixture(scope="module")
def scratch_pipeline(shared_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A copy of the shared run to change freely: same outputs, dvc.lock and DVC cache, no retraining.

    Its params (committed in the copy) name another registered model, so its select/promote, when a
    test reruns them, never move the shared run's champion alias; its runs get their own
    ``pipeline_id``. Only the registry stages depend on that name: no model is stale in the copy.
    """
    src = shared_pipeline.work
    work = tmp_path_factory.mktemp("scratch") / "repo"
    shutil.copytree(src, work, symlinks=True, ignore=shutil.ignore_patterns("data"))
    shutil.copytree(src / "data", work / "data", copy_function=os.link)
    params = _load_yaml(work / "params.yaml")
    params["registry"]["model_name"] += "-scratch"
    _write_yaml(work / "params.yaml", params)
    env = dict(shared_pipeline.env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "scratch copy"], work, env)
    return Pipeline(work=work, env=env, url=shared_pipeline.url, champion={}, params=params)
