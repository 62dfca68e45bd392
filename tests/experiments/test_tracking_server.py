"""The team's shared MLflow server: PostgreSQL backend store, S3 artifacts, proxied to clients.

The server is started by ``tools/mlflow_server.py`` itself (``make mlflow-server``; fixture in
``tests/team_server.py``): a real PostgreSQL cluster, a moto S3 server as the artifact store and
``mlflow server --serve-artifacts``, all on 127.0.0.1. Clients get ``MLFLOW_TRACKING_URI`` and nothing
else (no AWS credentials): artifacts must still go to S3 and come back through the server.

1. the evaluate stage's tracking helpers + ``registry.select`` on a tiny ONNX model, read back;
2. the real stages (prepare → train@* → evaluate@* → select → promote, run by ``dvc repro``) on a
   small data subset in a copy of the repo, then runs, alias and artifacts read back over plain HTTP;
   that run is the session's shared one (``tests/pipeline_run.py``), also read by
   ``tests/test_pipeline_e2e.py``, so the pipeline is trained once for both;
3. the UI in headless Chromium: the runs table and the registered model page with the alias, as DOM
   assertions plus screenshots kept in ``build/test-artifacts/mlflow-ui/`` (``TEST_ARTIFACTS_DIR``).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from config.paths import REPO_ROOT as REPO
from experiments import tracking
from registry import select as select_mod
from tests.pipeline_run import Pipeline
from tests.registry.test_select_promote import SIZE, _constant_onnx
from tests.team_server import require
from tools.mlflow_server import LOCAL_S3_CREDENTIALS, Stack

pytest.importorskip("mlflow")

MODEL_NAME = "vi-server-test"
BUCKET, PREFIX = "team-mlflow", "artifacts/"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--window-size=1600,1000", "--virtual-time-budget=20000",
]  # fmt: skip


def _get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _s3_keys(stack: Stack) -> list[str]:
    """Object keys in the artifact bucket, read with the server's (local, dummy) credentials."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=LOCAL_S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


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


@pytest.mark.slow
def test_pipeline_logs_registers_and_reads_back_through_server(
    use_server: str, team_server: Stack, tmp_path: Path
) -> None:
    import mlflow
    from mlflow import MlflowClient

    url = use_server
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
        json.dumps(summary | {"git_commit": "c" * 40, "data_version": tracking.data_version()})
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
    mine = [r for r in runs if r["info"]["run_id"] == run_id]
    assert len(mine) == 1
    assert {m["key"]: m["value"] for m in mine[0]["data"]["metrics"]}["image_AUROC"] == pytest.approx(0.9)
    status, text = _get(f"{url}/api/2.0/mlflow/registered-models/alias?name={MODEL_NAME}&alias=champion")
    assert status == 200 and json.loads(text)["model_version"]["run_id"] == run_id

    # The registered ONNX comes back byte-identical through the server's artifact proxy ...
    downloaded = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path / "dl"))
    )
    assert (downloaded / "model.onnx").read_bytes() == onnx_path.read_bytes()
    # ... and is stored in the server's S3 artifact destination, not in this checkout; this process
    # has no AWS credentials at all (use_server removed them), so the bytes came through the proxy.
    assert "AWS_ACCESS_KEY_ID" not in os.environ
    keys = _s3_keys(team_server)
    assert any(k.endswith("/model.onnx") for k in keys), keys
    assert any(run_id in k and k.endswith("/metrics.json") for k in keys), keys
    after = sorted(repo_artifacts.rglob("*")) if repo_artifacts.exists() else []
    assert after == before


def test_only_tracking_servers_choose_their_artifact_location() -> None:
    """Database and folder stores keep pinning artifacts beside the database (unchanged behaviour)."""
    assert tracking.is_tracking_server("http://127.0.0.1:5000")
    assert tracking.is_tracking_server("https://mlflow.example.com")
    assert not tracking.is_tracking_server("sqlite:////tmp/x/mlflow.db")
    assert not tracking.is_tracking_server("file:///tmp/mlruns")
    assert tracking.artifact_root("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlartifacts").resolve()


@pytest.mark.slow
def test_real_stages_log_register_and_promote_through_server(
    shared_pipeline: Pipeline, team_server: Stack
) -> None:
    pipeline = shared_pipeline
    url, work, champion = pipeline.url, pipeline.work, pipeline.champion
    name = pipeline.params["registry"]["model_name"]
    models = pipeline.models
    _, body = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={tracking.EXPERIMENT_NAME}")
    experiment = json.loads(body)["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")

    summaries = {m: json.loads((work / "build" / "eval" / m / "summary.json").read_text()) for m in models}
    filt = f"tags.pipeline_id = '{summaries['dfm']['pipeline_id']}'"
    runs = _post(
        f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "filter": filt}
    )
    by_model = {
        next(t["value"] for t in r["data"]["tags"] if t["key"] == "model_name"): r for r in runs["runs"]
    }
    assert set(by_model) == set(models)
    for model, run in by_model.items():
        assert run["info"]["run_id"] == summaries[model]["run_id"]
        logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        local = json.loads((work / "build" / "eval" / model / "metrics.json").read_text())
        assert logged["image_AUROC"] == pytest.approx(local["image_AUROC"])
        # The artifact comes back over HTTP through the server's proxy, byte-identical.
        query = urllib.parse.urlencode({"path": "metrics.json", "run_uuid": run["info"]["run_id"]})
        status, data = _get(f"{url}/get-artifact?{query}")
        assert status == 200 and json.loads(data) == json.loads(
            (work / "build" / "eval" / model / "metrics.json").read_text()
        )

    # The alias (read over REST) is the champion select chose, and promote served that version.
    status, body = _get(f"{url}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion")
    version = json.loads(body)["model_version"]
    assert version["version"] == champion["version"] and version["run_id"] == champion["run_id"]
    meta = json.loads((work / "serving" / "model" / "metadata.json").read_text())
    assert meta["run_id"] == champion["run_id"] and str(meta["registry_version"]) == champion["version"]
    # The release check (release/publish.py) agrees through the same URL: same name, version, run and
    # sha256 of the ONNX it downloads through the server's artifact proxy.
    from release import publish as release

    release.check_champion(
        release.load_promoted(work / "serving" / "model"), tracking_uri=url, model_name=name, alias="champion"
    )
    # Everything the pipeline logged sits in S3, not in the copy's folder.
    keys = _s3_keys(team_server)
    for model in models:
        assert any(summaries[model]["run_id"] in k for k in keys), (model, keys[:20])
    assert any(k.endswith("model.onnx") for k in keys)
    assert not (work / "mlartifacts").exists() and not (work / "mlflow.db").exists()


def _artifact_dir() -> Path:
    root = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO / "build" / "test-artifacts")
    out = root / "mlflow-ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    chromium = require("chromium", postgres=False)
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_ui_shows_runs_table_and_champion_alias(shared_pipeline: Pipeline, tmp_path: Path) -> None:
    """Rendered by the real UI bundle in headless Chromium; DOM asserted, screenshots kept."""
    url, champion = shared_pipeline.url, shared_pipeline.champion
    name = shared_pipeline.params["registry"]["model_name"]
    _, body = _get(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={tracking.EXPERIMENT_NAME}")
    experiment_id = json.loads(body)["experiment"]["experiment_id"]
    out = _artifact_dir()
    pages = {
        "runs-table": f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=TABLE",
        "registered-model": f"{url}/#/models/{name}",
    }
    dom: dict[str, str] = {}
    for key, page in pages.items():
        dom[key] = _chromium(["--dump-dom", page], tmp_path / f"profile-{key}").stdout
        png = out / f"{key}.png"
        png.unlink(missing_ok=True)
        _chromium([f"--screenshot={png}", page], tmp_path / f"profile-{key}-shot")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{png}: blank or missing screenshot"

    runs_dom = dom["runs-table"]
    assert "Run Name" in runs_dom, "runs table did not render"
    for model in shared_pipeline.models:
        assert f">{model}<" in runs_dom, f"run {model!r} not in the rendered runs table"
    model_dom = dom["registered-model"]
    assert f">{name}<" in model_dom
    assert f"Version {champion['version']}" in model_dom
    assert "champion" in model_dom, "alias champion not rendered on the registered model page"


def test_server_script_rejects_a_non_s3_artifact_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input to `make mlflow-server` is one line naming the option and what it must be."""
    from tools import mlflow_server

    code = mlflow_server.main(["--artifacts-destination", "/srv/artifacts", "--work-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0
    assert "--artifacts-destination must be an s3:// URI" in err and "/srv/artifacts" in err


def test_server_script_names_the_missing_postgresql_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from tools import mlflow_server

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(mlflow_server.Path, "glob", lambda self, pattern: iter(()))
    with pytest.raises(mlflow_server.ServerError, match="apt-get install -y postgresql"):
        mlflow_server.pg_binary("initdb")
