"""Fixtures and event builders for the serving tests (torch-free at import)."""

from __future__ import annotations

import base64
import io
import json
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


def rest_event(
    method: str,
    target: str,
    *,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    base64_encoded: bool | None = None,
    request_id: str = "v1-request-id",
    caller_arn: str | None = None,
    access_key: str | None = None,
    source_ip: str = "198.51.100.7",
) -> dict[str, Any]:
    """The REST API (payload 1.0) proxy event API Gateway sends for ``method target``.

    Built by :func:`serving.rest_event.build_event` (so tests, the local server and the edge agent
    send the same events); ``resource``/``pathParameters`` come from the route table, or
    name no route when ``target`` matches none (as a hand-made or misrouted event would).
    ``base64_encoded`` overrides API Gateway's binary-media-type decision.
    """
    from serving.rest_event import build_event
    from serving.routes import match_route

    path = target.split("?")[0]
    route = match_route(method, path)
    raw = body.encode() if isinstance(body, str) else (body or b"")
    event = build_event(
        method=method,
        target=target,
        headers=list((headers or {}).items()),
        body=raw,
        resource=route[0] if route else path,
        path_parameters=route[1] if route else None,
        source_ip=source_ip,
        host="abc123.execute-api.us-east-1.amazonaws.com",
        request_id=request_id,
        stage="prod",
        caller_arn=caller_arn,
        access_key=access_key,
    )
    if base64_encoded is not None and body is not None:
        event["body"], event["isBase64Encoded"] = _body(body, base64_encoded), base64_encoded
    return event


def v1_event(
    body: bytes | str | None,
    headers: dict[str, str] | None = None,
    *,
    base64_encoded: bool = True,
    path_parameters: dict[str, str] | None = None,
    request_id: str = "v1-request-id",
    query: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A REST v1 ``POST /cameras/{camera_id}/images`` event; without ``path_parameters`` it names no
    camera in the path (so the parser's header/body/default camera rules can be tested)."""
    camera = (path_parameters or {}).get("camera_id", "unnamed")
    target = f"/cameras/{camera}/images"
    if query:
        from urllib.parse import urlencode

        target += "?" + urlencode(query)
    event = rest_event(
        "POST", target, body=body, headers=headers, base64_encoded=base64_encoded, request_id=request_id
    )
    event["pathParameters"] = path_parameters
    return event


def header(response: dict[str, Any], name: str) -> str | None:
    """A response header by case-insensitive name, from ``headers`` or ``multiValueHeaders``."""
    for key, value in (response.get("headers") or {}).items():
        if key.lower() == name.lower():
            return value
    for key, values in (response.get("multiValueHeaders") or {}).items():
        if key.lower() == name.lower() and values:
            return values[-1]
    return None


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
