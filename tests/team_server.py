"""Fixture: the team's MLflow server as ``make mlflow-server`` runs it (PostgreSQL + S3 artifacts).

Started through ``tools.mlflow_server.shared_server`` itself, so the tests exercise the same code
the team uses: a real PostgreSQL cluster (Debian package) in a temp folder, a moto S3 server as the
artifact store, and ``mlflow server --serve-artifacts`` in front of both, all on 127.0.0.1.

Needs the ``postgresql`` Debian package (``make system-deps``). Without it the tests skip with the
fix in the message, except in CI (``CI=true``), where a missing install step must fail loudly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import mlflow_server


def require(program: str, postgres: bool = True) -> str:
    """Path of ``program`` (a PostgreSQL server program, else one on PATH) or skip/fail with the fix."""
    try:
        path = mlflow_server.pg_binary(program) if postgres else shutil.which(program)
    except mlflow_server.ServerError:
        path = None
    if path:
        return path
    message = f"{program} not installed: run `make system-deps` (apt-get install postgresql chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mlflow_server.Stack]:
    """One PostgreSQL + moto S3 + mlflow server stack per test session (per xdist worker).

    Shared by every module that uses it: each registers its own model names and finds its runs by
    its own experiment, ``pipeline_id`` or run ids, so none depends on what the others logged.
    """
    require("initdb")
    work: Path = tmp_path_factory.mktemp("team-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with mlflow_server.shared_server(
        work_dir=work,
        port=mlflow_server.free_port(),
        artifacts_destination="s3://team-mlflow/artifacts",
        local_s3=True,
        # one uvicorn process (requests still run concurrently in its thread pool): on a loaded
        # machine a multi-worker supervisor kills children that import MLflow too slowly.
        workers=1,
        env=env,
    ) as stack:
        yield stack


@pytest.fixture
def use_server(team_server: mlflow_server.Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point this process at the server by ``MLFLOW_TRACKING_URI`` alone (no AWS credentials)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)
    for key in (
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield team_server.url
    finally:
        # setup_tracking()/get_client() set MLflow's process-wide URIs; do not leak them.
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
