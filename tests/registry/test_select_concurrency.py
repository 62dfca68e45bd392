"""Two ``select`` stages racing against one shared tracking server (PostgreSQL + S3, real MLflow).

The rule under test (``registry/select.py`` docstring): registry updates run under an atomic lock
(registered model ``<name>.select-lock``), so whatever the interleaving the alias ends on the version
chosen by the last select to finish, its tags and the registered model's ``champion_*`` tags describe
that same selection and data, and ``selection_seq`` counts every selection exactly once. The racers
are separate processes running ``python -m registry.select``, as two ``dvc repro`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.paths import REPO_ROOT as REPO
from registry import select as select_mod
from tests.registry.test_select_promote import _constant_onnx
from tools.mlflow_server import Stack

pytestmark = pytest.mark.slow  # the team's MLflow server (PostgreSQL + S3)

MODEL_NAME = "vi-race"
ROUNDS = 2


def _params(models: list[str]) -> dict[str, Any]:
    return {
        "models": {m: {} for m in models},
        "selection": {"metric": "image_AUROC", "tie_tolerance": 0.005, "tie_breaker": "latency_ms"},
        "registry": {"model_name": MODEL_NAME, "alias": "champion"},
    }


def _pipeline(root: Path, data_version: str, auroc: dict[str, float], onnx_path: Path) -> Path:
    """One checkout's build/eval: a logged MLflow run per model, tagged with this pipeline's data."""
    import mlflow
    import mlflow.onnx
    import onnx

    experiment = mlflow.set_experiment("race")
    for model, value in auroc.items():
        tags = {"data_version": data_version, "model_name": model, "pipeline_id": root.name}
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=model, tags=tags) as run:
            mlflow.log_metric("image_AUROC", value)
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", save_as_external_data=False)
        metrics = {"image_AUROC": value, "latency_ms": 5.0, "model_size_mb": 0.01, "onnx_max_abs_diff": 0.0}
        folder = root / "build" / "eval" / model
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
        summary = {
            "model": model,
            "run_id": run.info.run_id,
            "model_uri": info.model_uri,
            "metrics": metrics,
            "data_version": data_version,
            "pipeline_id": root.name,
        }
        (folder / "summary.json").write_text(json.dumps(summary))
    (root / "params.yaml").write_text(yaml.safe_dump(_params(list(auroc))))
    return root


def _select_cli(root: Path, url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= {"MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "registry.select", "--params", "params.yaml"]
    return subprocess.Popen(cmd, cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _check_consistent(client: Any, records: list[dict[str, Any]], runs: dict[str, str]) -> dict[str, Any]:
    """The invariants of the rule; returns the winning record."""
    winner = max(records, key=lambda r: r["selection_seq"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    reg = client.get_registered_model(MODEL_NAME)
    # The alias is on the version of the last selection, and every tag describes that selection.
    assert str(champion.version) == winner["version"] and champion.run_id == winner["run_id"]
    assert champion.tags["selection_seq"] == str(winner["selection_seq"])
    assert reg.tags["champion_version"] == winner["version"]
    assert reg.tags["selection_seq"] == str(winner["selection_seq"])
    # Trained on the data the moving run claims: version tag == run tag == registered-model tag.
    run_data = client.get_run(champion.run_id).data.tags["data_version"]
    assert champion.tags["data_version"] == run_data == reg.tags["champion_data_version"]
    assert runs[champion.run_id] == run_data
    # The lock is released.
    assert not client.search_registered_models(f"name = '{select_mod.lock_name(MODEL_NAME)}'")
    return winner


def test_racing_selects_leave_a_consistent_champion(
    use_server: str, team_server: Stack, tmp_path: Path
) -> None:
    from registry.mlflow_client import get_client

    client = get_client()
    onnx_a = _constant_onnx(tmp_path / "a.onnx", 0.1)
    onnx_b = _constant_onnx(tmp_path / "b.onnx", 0.2)
    # Two checkouts on different data, each with its own winner (a: padim, b: dfm).
    a = _pipeline(tmp_path / "pipe-a", "data-a.dir", {"padim": 0.9, "dfm": 0.8}, onnx_a)
    b = _pipeline(tmp_path / "pipe-b", "data-b.dir", {"padim": 0.7, "dfm": 0.95}, onnx_b)
    runs = {
        json.loads((root / "build/eval" / m / "summary.json").read_text())["run_id"]: data
        for root, data in ((a, "data-a.dir"), (b, "data-b.dir"))
        for m in ("padim", "dfm")
    }
    seqs: list[int] = []
    for _ in range(ROUNDS):
        procs = [_select_cli(a, use_server), _select_cli(b, use_server)]
        outs = [p.communicate(timeout=300) for p in procs]
        for proc, (out, err) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, f"select failed:\n{out}\n{err}"
        records = [json.loads((root / "build/registry/champion.json").read_text()) for root in (a, b)]
        assert {r["model"] for r in records} == {"padim", "dfm"}
        winner = _check_consistent(client, records, runs)
        # Both selections counted once, one after the other: consecutive sequence numbers.
        assert sorted(r["selection_seq"] for r in records) == [
            winner["selection_seq"] - 1,
            winner["selection_seq"],
        ]
        seqs += [r["selection_seq"] for r in records]
    assert sorted(seqs) == list(range(1, 2 * ROUNDS + 1))
    # Re-runs reused the two registered versions instead of piling up duplicates.
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert len(versions) == 2


def test_select_waits_for_the_lock_and_names_its_holder(use_server: str, tmp_path: Path) -> None:
    from registry.mlflow_client import get_client
    from registry.rule import Candidate, SelectionRule, select

    client = get_client()
    root = _pipeline(
        tmp_path / "pipe-c", "data-c.dir", {"padim": 0.9}, _constant_onnx(tmp_path / "c.onnx", 0.3)
    )
    summary = select_mod.load_summary(root / "build" / "eval", "padim")
    selection = select(
        [Candidate("padim", summary.metrics)], SelectionRule.from_params(_params(["padim"])["selection"])
    )
    released = threading.Event()
    with select_mod.registry_lock(client, MODEL_NAME) as token:
        with pytest.raises(select_mod.RegistryError, match=token.split(":")[-1]) as exc:
            select_mod.register_champion(
                client, selection, summary, model_name=MODEL_NAME, alias="champion", lock_wait_s=1.0
            )
        assert "--break-lock" in str(exc.value)

        # A waiting select proceeds as soon as the holder releases.
        result: dict[str, Any] = {}

        def waiter() -> None:
            result["record"] = select_mod.register_champion(
                get_client(), selection, summary, model_name=MODEL_NAME, alias="champion", lock_wait_s=60
            )
            released.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        assert not released.wait(1.5), "select ran while another held the lock"
    thread.join(timeout=60)
    assert result["record"]["run_id"] == summary.run_id
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").run_id == summary.run_id


def test_champion_run_logged_on_other_data_is_refused(use_server: str, tmp_path: Path) -> None:
    from registry.mlflow_client import get_client

    root = _pipeline(
        tmp_path / "pipe-d", "data-d.dir", {"padim": 0.99}, _constant_onnx(tmp_path / "d.onnx", 0.4)
    )
    path = root / "build" / "eval" / "padim" / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps(summary | {"data_version": "some-other-data.dir"}))
    client = get_client()
    before = client.get_model_version_by_alias(MODEL_NAME, "champion")
    with pytest.raises(select_mod.RegistryError, match=r"logged on data 'data-d\.dir'"):
        select_mod.run(
            _params(["padim"]), eval_dir=root / "build" / "eval", out_dir=root / "build" / "registry"
        )
    after = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert after.version == before.version  # nothing moved
