"""Fixtures and event builders for the serving tests (torch-free at import)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

TABLE = "inspection-results"
BUCKET = "inspection-results-bucket"


def image_bytes(size: tuple[int, int] = (96, 80), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A deterministic RGB test picture (gradient + seed-dependent stripe) encoded as PNG/JPEG."""
    width, height = size
    image = Image.new("RGB", size)
    pixels = image.load()
    assert pixels is not None
    for x in range(width):
        for y in range(height):
            stripe = 255 if (x + seed * 7) % 23 < 3 else 0
            pixels[x, y] = ((x * 255) // max(width - 1, 1), (y * 255) // max(height - 1, 1), stripe)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def elpv_image_bytes(index: int = 0) -> bytes:
    """Bytes of a real ELPV cell PNG (300x300 greyscale) from the installed dataset wheel."""
    from tools.tiny_model import elpv_samples

    normal, defect = elpv_samples(4, 4)
    return (normal + defect)[index].read_bytes()


def _body(body: bytes | str | None, base64_encoded: bool) -> str | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        return base64.b64encode(body).decode() if base64_encoded else body.decode("latin-1")
    return base64.b64encode(body.encode()).decode() if base64_encoded else body


def v1_event(
    body: bytes | str | None,
    headers: dict[str, str] | None = None,
    *,
    base64_encoded: bool = True,
    path_parameters: dict[str, str] | None = None,
    request_id: str = "v1-request-id",
) -> dict[str, Any]:
    """API Gateway REST API (payload v1) proxy event."""
    return {
        "resource": "/cameras/{camera_id}/score",
        "path": "/cameras/x/score",
        "httpMethod": "POST",
        "headers": headers or {},
        "multiValueHeaders": {k: [v] for k, v in (headers or {}).items()},
        "queryStringParameters": None,
        "pathParameters": path_parameters,
        "requestContext": {"requestId": request_id, "stage": "prod", "httpMethod": "POST"},
        "body": _body(body, base64_encoded),
        "isBase64Encoded": base64_encoded,
    }


def v2_event(
    body: bytes | str | None,
    headers: dict[str, str] | None = None,
    *,
    base64_encoded: bool = True,
    path_parameters: dict[str, str] | None = None,
    request_id: str = "v2-request-id",
    domain: str = "abc123.execute-api.us-east-1.amazonaws.com",
) -> dict[str, Any]:
    """API Gateway HTTP API (payload v2) event."""
    return {
        "version": "2.0",
        "routeKey": "POST /score",
        "rawPath": "/score",
        "rawQueryString": "",
        "headers": headers or {},
        "pathParameters": path_parameters,
        "requestContext": {
            "requestId": request_id,
            "domainName": domain,
            "http": {"method": "POST", "path": "/score"},
        },
        "body": _body(body, base64_encoded),
        "isBase64Encoded": base64_encoded,
    }


def url_event(
    body: bytes | str | None, headers: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Lambda function URL event (a v2 payload served from ``*.lambda-url.*``)."""
    kwargs.setdefault("request_id", "url-request-id")
    return v2_event(body, headers, domain="abcdefgh.lambda-url.us-east-1.on.aws", **kwargs)


EVENT_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "apigw-rest-v1": v1_event,
    "apigw-http-v2": v2_event,
    "function-url": url_event,
}


def json_body(image: bytes, **fields: Any) -> str:
    return json.dumps({"image": base64.b64encode(image).decode(), **fields})


@pytest.fixture(scope="session")
def scorer(serving_model_dir: Path):  # -> core.scoring.Scorer
    """One ONNX Runtime session on the tiny fixture model for the whole session."""
    from core.scoring import Scorer

    return Scorer.from_dir(serving_model_dir)


@pytest.fixture
def aws_resources(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Empty moto account with the results table and bucket created; env points serving at them."""
    from serving.storage import create_resources

    monkeypatch.setenv("RESULTS_TABLE", TABLE)
    monkeypatch.setenv("RESULTS_BUCKET", BUCKET)
    monkeypatch.setenv("RESULTS_PREFIX", "results/")
    create_resources(TABLE, BUCKET)
    return aws_env
