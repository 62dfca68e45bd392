"""Shared pytest fixtures.

Kept torch-free at import time: serving tests must be collectable in a venv that only has
``serving/requirements.txt`` (+ pytest, moto). The tiny model is built lazily, or taken from
``SERVING_MODEL_DIR`` when that points at a prebuilt model folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Session fixtures of the slow tests, defined beside their helpers and registered here once, so one
# instance serves every folder: the team's MLflow server (PostgreSQL + S3) and the shared pipeline run.
from tests.pipeline_run import scratch_pipeline, shared_pipeline  # noqa: F401  (fixtures)
from tests.team_server import team_server, use_server  # noqa: F401  (fixtures)

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like ``serving/model/`` (``model.onnx`` + ``metadata.json``), 64x64 input.

    Built once per session from a tiny PaDiM (see ``tools/tiny_model.py``), unless
    ``SERVING_MODEL_DIR`` names a prebuilt one (e.g. in a torch-free venv).
    """
    prebuilt = os.environ.get("SERVING_MODEL_DIR")
    if prebuilt:
        path = Path(prebuilt)
        if not (path / "metadata.json").is_file():
            raise RuntimeError(f"SERVING_MODEL_DIR={prebuilt} has no metadata.json")
        return path
    from tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), image_size=64)


def _atomic_dynamodb_writes() -> None:
    """Make moto's DynamoDB writes atomic, as DynamoDB's are.

    moto's threaded server evaluates a ``ConditionExpression`` and then writes without a lock, so two
    concurrent conditional puts of one key can both succeed (seen under CPU load: two different
    images both answered 200 for one idempotency key). Real DynamoDB evaluates the condition and
    writes the item atomically; the storage code relies on that, so the test server must too.
    """
    import functools
    import threading

    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, "_vi_atomic", False):
        return
    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        @functools.wraps(original)
        def locked(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return __original(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, locked)
    DynamoDBBackend._vi_atomic = True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real local AWS endpoint (moto's threaded HTTP server on 127.0.0.1, random port).

    Yields the endpoint URL. Tests talk to it over HTTP through ordinary boto3 clients,
    so retries, error codes and serialisation are the real ones.
    """
    from moto.server import ThreadedMotoServer

    _atomic_dynamodb_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point every boto3 client at the moto server with dummy credentials; returns the endpoint.

    Also resets moto's state so each test starts from an empty account.
    """
    import urllib.request

    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    return moto_server
