"""Parallel sweeps: ``dvc exp run --queue`` + ``dvc queue start -j 2``, each experiment in MLflow by name.

A tiny DVC pipeline (one stage, a few ELPV files as data) in a throwaway git repo whose stage logs
through the project's own ``experiments/tracking.py`` (copied in) to the team's MLflow server
(PostgreSQL + S3, ``tests/team_server.py``). DVC sets ``DVC_EXP_NAME`` in the stage's environment;
``tracking.run_tags`` turns it into the run tag ``dvc_exp_name``. The assertions tie every queued
experiment (``dvc exp show --json``) to exactly one MLflow run with the same name and metric.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from config.paths import REPO_ROOT as REPO
from tools.mlflow_server import Stack
from tools.tiny_model import elpv_samples

pytestmark = pytest.mark.slow  # the team's MLflow server (PostgreSQL + S3)

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
SWEEP = {"sweep-lr-01": 0.1, "sweep-lr-05": 0.5}  # two experiments, two workers: run at once
QUEUE_TIMEOUT_S = 600

STAGE = '''\
"""Toy training stage: a score from params, logged to MLflow with the project's tracking tags."""
import json, pathlib, yaml, mlflow
from experiments import tracking

params = yaml.safe_load(open("params.yaml"))
score = round(1.0 - (params["lr"] - 0.3) ** 2, 6)
tracking.setup_tracking()
experiment_id = tracking.get_or_create_experiment("dvc-queue-sweep")
tags = tracking.run_tags("toy", params, "train")
with mlflow.start_run(experiment_id=experiment_id, run_name="toy", tags=tags):
    mlflow.log_params(tracking.flatten(params))
    mlflow.log_metric("score", score)
pathlib.Path("metrics.json").write_text(json.dumps({"score": score}))
'''

DVC_YAML = """\
stages:
  train:
    cmd: python train.py
    deps: [train.py, data, experiments/tracking.py, config/tracking_uri.py]
    params: [lr]
    metrics:
      - metrics.json:
          cache: false
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _exp_results(repo: Path, env: dict[str, str]) -> dict[str, float]:
    """``{experiment name: score}`` from ``dvc exp show --json``."""
    shown = json.loads(_run([DVC, "exp", "show", "--json"], repo, env))
    results: dict[str, float] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            name = node.get("name")
            data = node.get("data") or {}
            metrics = (data.get("metrics") or {}).get("metrics.json", {}).get("data", {})
            if name in SWEEP and "score" in metrics:
                results[name] = metrics["score"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return results


def test_queued_sweep_runs_in_parallel_and_lands_in_mlflow_by_name(
    team_server: Stack, tmp_path: Path
) -> None:
    repo = tmp_path / "sweep"
    (repo / "experiments").mkdir(parents=True)
    (repo / "serving").mkdir()
    (repo / "config").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_", "MLFLOW_", "AWS_"))}
    env |= {
        "HOME": str(tmp_path / "home"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp_path / "site-cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": team_server.url,  # the only link to the server
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    (tmp_path / "home").mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    for key, value in (("user.name", "sweeper"), ("user.email", "sweeper@example.invalid")):
        _run(["git", "config", key, value], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    # tracking.py and the modules it imports at load time (the repo root, the tracking-URI rule)
    for rel in (
        "experiments/__init__.py",
        "experiments/tracking.py",
        "serving/__init__.py",
        "config/__init__.py",
        "config/paths.py",
        "config/tracking_uri.py",
    ):
        shutil.copyfile(REPO / rel, repo / rel)
    (repo / "data").mkdir()
    for p in elpv_samples(n_normal=2, n_defect=1)[0]:
        shutil.copyfile(p, repo / "data" / p.name)
    (repo / "train.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "params.yaml").write_text("lr: 0.2\n")
    _run([DVC, "add", "-q", "data"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "toy sweep"], repo, env)

    # The README's commands: queue the sweep, then run it with two workers.
    for name, lr in SWEEP.items():
        _run([DVC, "exp", "run", "--queue", "-n", name, "-S", f"lr={lr}"], repo, env)
    _run([DVC, "queue", "start", "-j", "2"], repo, env)
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    try:
        while True:
            status = _run([DVC, "queue", "status"], repo, env)
            if not any(word in status for word in ("Queued", "Running")):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"queue not done in {QUEUE_TIMEOUT_S}s:\n{status}")
            time.sleep(2)
    finally:
        subprocess.run([DVC, "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
    assert "Failed" not in status, status
    results = _exp_results(repo, env)
    assert set(results) == set(SWEEP), (results, status)
    for name, lr in SWEEP.items():
        assert results[name] == pytest.approx(1.0 - (lr - 0.3) ** 2)

    # Each experiment is exactly one MLflow run tagged with its DVC experiment name.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team_server.url)
    experiment = client.get_experiment_by_name("dvc-queue-sweep")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    by_name = {r.data.tags.get("dvc_exp_name"): r for r in runs}
    assert len(runs) == len(SWEEP) and set(by_name) == set(SWEEP), [r.data.tags for r in runs]
    for name, lr in SWEEP.items():
        run = by_name[name]
        assert run.data.params["lr"] == str(lr)
        assert run.data.metrics["score"] == pytest.approx(results[name])
        assert run.data.tags.get("dvc_exp_baseline_rev"), "baseline commit missing"
