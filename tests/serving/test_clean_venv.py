"""The handler runs from a venv with only the serving requirements, driven by the real RIC.

No Docker engine is available, so this is the closest stand-in for the Lambda image: a
fresh venv from ``serving/requirements.txt`` + ``awslambdaric`` (what the image installs),
``python -m awslambdaric serving.app.handler`` (the image's ENTRYPOINT + CMD), and a
Runtime API server written here that speaks Lambda's protocol (``/2018-06-01/runtime/...``)
on 127.0.0.1. Storage is the local moto endpoint.
"""

from __future__ import annotations

import io
import json
import os
import queue
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image

from serving.storage import create_resources
from tools.clean_venv import REPO, ensure_venv, installed_mb, pip_list, python, site_packages
from tools.local_server import build_event

pytestmark = pytest.mark.slow  # builds a venv on first use (~30 s with a warm pip cache)

FORBIDDEN = {
    "torch",
    "torchvision",
    "anomalib",
    "lightning",
    "pytorch-lightning",
    "timm",
    "mlflow",
    "openvino",
}
TABLE = BUCKET = "clean-venv-results"
PREFIX = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:vi"


@dataclass
class RuntimeApi:
    """Lambda's Runtime API: hands out queued events, collects responses and errors."""

    events: queue.Queue[tuple[str, dict[str, Any]]] = field(default_factory=queue.Queue)
    results: dict[str, tuple[str, Any]] = field(default_factory=dict)
    init_error: Any = None
    done: threading.Condition = field(default_factory=threading.Condition)
    stopping: threading.Event = field(default_factory=threading.Event)

    def invoke(self, event: dict[str, Any], timeout: float = 120) -> tuple[str, Any]:
        """Queue one invocation and wait for ``("response" | "error", payload)``."""
        request_id = str(uuid.uuid4())
        self.events.put((request_id, event))
        with self.done:
            ok = self.done.wait_for(lambda: request_id in self.results or self.init_error, timeout)
        assert ok, "no result from the runtime within the timeout"
        assert self.init_error is None, f"init error: {self.init_error}"
        return self.results[request_id]

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path != f"{PREFIX}/invocation/next":
                    self._reply(404, b'{"errorType":"NotFound"}')
                    return
                while not api.stopping.is_set():  # long poll, as the real API does
                    try:
                        request_id, event = api.events.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                else:
                    return
                deadline = int((time.time() + 30) * 1000)
                self._reply(
                    200,
                    json.dumps(event).encode(),
                    {
                        "Lambda-Runtime-Aws-Request-Id": request_id,
                        "Lambda-Runtime-Deadline-Ms": str(deadline),
                        "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                        "Lambda-Runtime-Trace-Id": "Root=1-00000000-000000000000000000000000;Sampled=0",
                    },
                )

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                payload = json.loads(body) if body else None
                parts = self.path.removeprefix(PREFIX).strip("/").split("/")
                with api.done:
                    if parts == ["init", "error"]:
                        api.init_error = payload
                    elif len(parts) == 3 and parts[0] == "invocation" and parts[2] in {"response", "error"}:
                        api.results[parts[1]] = (parts[2], payload)
                    else:
                        self._reply(404, b"{}")
                        return
                    api.done.notify_all()
                self._reply(202, b'{"status":"OK"}')

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture(scope="module")
def venv() -> Path:
    return ensure_venv()


@pytest.fixture
def runtime(
    venv: Path, aws_env: str, serving_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[RuntimeApi, subprocess.Popen[bytes]]]:
    """Runtime API on 127.0.0.1 + ``awslambdaric serving.app.handler`` from the clean venv."""
    create_resources(TABLE, BUCKET)
    api = RuntimeApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), api.handler_class())
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    env = {
        k: os.environ[k] for k in ("PATH", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    }
    env.update(
        HOME=str(tmp_path),  # like Lambda: nothing useful in HOME
        PYTHONPATH=str(REPO),
        LAMBDA_TASK_ROOT=str(REPO),
        AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{port}",
        AWS_LAMBDA_FUNCTION_NAME="vi",
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE="2048",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=aws_env,
        MODEL_DIR=str(serving_model_dir),
        RESULTS_TABLE=TABLE,
        RESULTS_BUCKET=BUCKET,
        _HANDLER="serving.app.handler",
    )
    log = (tmp_path / "runtime.log").open("wb")
    proc = subprocess.Popen(
        [str(python(venv)), "-m", "awslambdaric", "serving.app.handler"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield api, proc
    finally:
        api.stopping.set()
        proc.kill()
        proc.wait(timeout=30)
        server.shutdown()
        server.server_close()
        log.close()
        if api.init_error is not None:
            print((tmp_path / "runtime.log").read_text())


def png_event(image_bytes: bytes, request_id: str, camera: str = "cam-1") -> dict[str, Any]:
    return build_event(
        method="POST",
        target=f"/cameras/{camera}/images",
        headers=[("content-type", "image/png"), ("x-request-id", request_id)],
        body=image_bytes,
        resource="/cameras/{camera_id}/images",
        path_parameters={"camera_id": camera},
        source_ip="127.0.0.1",
        host="abc123.execute-api.us-east-1.amazonaws.com",
    )


def test_clean_venv_has_no_training_stack(venv: Path, record_property: pytest.RecordProperty) -> None:
    installed = pip_list(venv)
    assert {"onnxruntime", "numpy", "pillow", "boto3", "awslambdaric"} <= set(installed)
    assert not FORBIDDEN & set(installed), FORBIDDEN & set(installed)
    probe = subprocess.run([str(python(venv)), "-c", "import torch"], capture_output=True, cwd="/")
    assert probe.returncode != 0
    size = installed_mb(site_packages(venv))
    record_property("site_packages_mb", round(size, 1))
    print(f"\nclean serving venv: {len(installed)} packages, site-packages {size:.1f} MB")


def test_handler_through_the_lambda_runtime_protocol(
    runtime: tuple[RuntimeApi, subprocess.Popen[bytes]], aws_env: str
) -> None:
    api, proc = runtime
    buffer = io.BytesIO()
    Image.new("RGB", (80, 80), (120, 120, 120)).save(buffer, format="PNG")

    kind, result = api.invoke(png_event(buffer.getvalue(), "ric-ok-1"))
    assert kind == "response", result
    assert result["statusCode"] == 200, result
    body = json.loads(result["body"])
    assert isinstance(body["score"], float) and body["request_id"] == "ric-ok-1"

    item = boto3.client("dynamodb").get_item(
        TableName=TABLE, Key={"camera_id": {"S": "cam-1"}, "request_id": {"S": "ric-ok-1"}}
    )
    assert "Item" in item
    key = body["result_uri"].removeprefix(f"s3://{BUCKET}/")
    assert boto3.client("s3").head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0

    # Same process, next invocation: an undecodable image is a 4xx response, not a crash.
    kind, result = api.invoke(png_event(b"\x89PNG not really", "ric-bad-1"))
    assert kind == "response", result
    assert 400 <= result["statusCode"] < 500
    assert json.loads(result["body"])["error"]["code"] == "invalid_image"
    assert proc.poll() is None  # the runtime is still waiting for the next event
