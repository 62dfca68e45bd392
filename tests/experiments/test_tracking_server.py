"""``MLFLOW_TRACKING_URI=http://...`` points the pipeline at a shared MLflow tracking server.

A real ``mlflow server`` (sqlite backend, proxied artifacts in a temp folder) is started on a free
port of 127.0.0.1. The evaluate stage's tracking helpers log a run to it, the registry code path
(``registry.select.run`` → ``registry.mlflow_client.get_client``) registers a real ONNX model and
moves the alias ``champion``, and everything is read back over HTTP. The artifacts must land in the
server's ``--artifacts-destination``, not in a folder of the client's checkout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from experiments import tracking
from registry import select as select_mod
from tests.registry.test_select_promote import SIZE, _constant_onnx

pytest.importorskip("mlflow")

START_TIMEOUT_S = 120
MODEL_NAME = "vi-server-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the server's whole process group (uvicorn forks a worker)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    log = (root / "server.log").open("wb")
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}:\n{(root / 'server.log').read_text()}"
                )
            try:
                if _get(f"{url}/health", timeout=2)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not up in {START_TIMEOUT_S}s:\n{(root / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield {"url": url, "root": root, "artifacts": artifacts}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def remote(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield server
    finally:
        # setup_tracking() sets MLflow's process-wide URIs; do not leak the server to other tests.
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def _log_like_evaluate(
    model: str, onnx_path: Path, out_dir: Path, metrics: dict[str, float]
) -> tuple[str, str]:
    """The calls of ``experiments/evaluate.py: log_to_mlflow`` on a tiny real ONNX model."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    params = {"data": {"image_size": SIZE}, "models": {model: {"n_features": 8}}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    experiment_id = tracking.get_or_create_experiment()
    tags = tracking.run_tags(model, params, f"evaluate@{model}")
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
    with mlflow.start_run(experiment_id=experiment_id, run_name=model, tags=tags) as run:
        mlflow.log_params(tracking.flatten(params))
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"seconds": 1.0}, "train/train.json")
        mlflow.log_artifact(str(out_dir / "metrics.json"))
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            signature=infer_signature(x, outs),
            save_as_external_data=False,
            pip_requirements=["onnxruntime", "onnx"],
        )
    return run.info.run_id, info.model_uri


def test_pipeline_logs_registers_and_reads_back_through_server(
    remote: dict[str, Any], tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    url = remote["url"]
    assert tracking.setup_tracking() == url
    assert tracking.is_tracking_server(url)
    repo_artifacts = tracking.REPO_ROOT / "mlartifacts"
    before = sorted(repo_artifacts.rglob("*")) if repo_artifacts.exists() else []

    # (a) log a run the way evaluate.py does
    onnx_path = _constant_onnx(tmp_path / "model.onnx", 0.25)
    metrics = {
        "image_AUROC": 0.9,
        "image_F1Score": 0.5,
        "latency_ms": 5.0,
        "torch_latency_ms": 10.0,
        "model_size_mb": onnx_path.stat().st_size / 1e6,
        "onnx_max_abs_diff": 0.0,
    }
    run_id, model_uri = _log_like_evaluate("padim", onnx_path, tmp_path, metrics)
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT_NAME)
    assert experiment is not None
    # The server, not this checkout, decides where artifacts go (proxied mlflow-artifacts:).
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location

    # (b) register + alias through the registry stage's code path (get_client → MLFLOW_TRACKING_URI)
    folder = tmp_path / "build" / "eval" / "padim"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    summary = {"model": "padim", "run_id": run_id, "model_uri": model_uri, "metrics": metrics}
    (folder / "summary.json").write_text(
        json.dumps(summary | {"git_commit": "c" * 40, "data_version": "d.dir"})
    )
    params = {
        "models": {"padim": {}},
        "selection": {"metric": "image_AUROC", "tie_tolerance": 0.005, "tie_breaker": "latency_ms"},
        "registry": {"model_name": MODEL_NAME, "alias": "champion"},
    }
    record = select_mod.run(
        params, eval_dir=tmp_path / "build" / "eval", out_dir=tmp_path / "build" / "registry"
    )
    assert record["model"] == "padim" and record["version"] == "1" and record["run_id"] == run_id

    # (c) read everything back with a fresh client and over the REST API
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    run = client.get_run(run_id)
    assert run.data.metrics["image_AUROC"] == pytest.approx(0.9)
    assert run.data.params["models.padim.n_features"] == "8"
    assert run.data.tags["dvc_stage"] == "evaluate@padim" and run.data.tags["model_name"] == "padim"
    assert run.data.tags["pipeline_id"] and run.data.tags["data_version"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "train"}
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == "1" and champion.run_id == run_id
    assert champion.tags["selected_by"] == "registry.select"

    body = json.dumps({"experiment_ids": [experiment.experiment_id], "filter": "tags.model_name = 'padim'"})
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", data=body.encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        runs = json.loads(resp.read())["runs"]
    assert [r["info"]["run_id"] for r in runs] == [run_id]
    assert {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}["image_AUROC"] == pytest.approx(0.9)
    status, text = _get(f"{url}/api/2.0/mlflow/registered-models/alias?name={MODEL_NAME}&alias=champion")
    assert status == 200 and json.loads(text)["model_version"]["run_id"] == run_id

    # The registered ONNX comes back byte-identical through the server's artifact proxy ...
    downloaded = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert (downloaded / "model.onnx").read_bytes() == onnx_path.read_bytes()
    # ... and is stored in the server's artifact destination, not in this checkout.
    assert list(remote["artifacts"].rglob("model.onnx"))
    assert list(remote["artifacts"].rglob("metrics.json"))
    after = sorted(repo_artifacts.rglob("*")) if repo_artifacts.exists() else []
    assert after == before


def test_ui_is_served(server: dict[str, Any]) -> None:
    status, text = _get(f"{server['url']}/")
    assert status == 200
    assert "MLflow" in text or "static-files" in text
    assert "<html" in text.lower() or "<!doctype html" in text.lower()


def test_only_tracking_servers_choose_their_artifact_location() -> None:
    """Database and folder stores keep pinning artifacts beside the database (unchanged behaviour)."""
    assert tracking.is_tracking_server("http://127.0.0.1:5000")
    assert tracking.is_tracking_server("https://mlflow.example.com")
    assert not tracking.is_tracking_server("sqlite:////tmp/x/mlflow.db")
    assert not tracking.is_tracking_server("file:///tmp/mlruns")
    assert tracking.artifact_root("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlartifacts").resolve()
