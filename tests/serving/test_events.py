"""Event parsing and validation of REST v1 events: every accepted body, every bad input mapped to its status.

Production is API Gateway REST (payload 1.0), so every event here is one (built by the local
server's ``build_event``); the HTTP API v2 / function-URL shapes the parser used to take are gone.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from datetime import UTC, datetime

import pytest
from PIL import Image

from serving.events import RequestError, RequestLimits, normalise_timestamp, parse_event
from tests.serving.conftest import image_bytes, json_body, v1_event


def _error(event: dict, limits: RequestLimits | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_event(event, limits)
    return info.value


@pytest.mark.parametrize("fmt,content_type", [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_binary_body(fmt: str, content_type: str) -> None:
    data = image_bytes(fmt=fmt)
    event = v1_event(data, {"Content-Type": content_type, "X-Camera-Id": "cam-7"})
    assert event["isBase64Encoded"] is True  # a binary media type: API Gateway base64-encodes it
    request = parse_event(event)
    assert request.image_bytes == data
    assert request.content_type == content_type
    assert request.image.size == (96, 80)
    assert request.camera_id == "cam-7"
    assert request.request_id == event["requestContext"]["requestId"]
    assert request.captured_at.endswith("Z")


def test_json_body() -> None:
    data = image_bytes(fmt="JPEG")
    body = json_body(data, camera_id="line-3", captured_at="2026-01-02T03:04:05+01:00")
    request = parse_event(
        v1_event(body, {"content-type": "application/json; charset=utf-8"}, base64_encoded=False)
    )
    assert request.image_bytes == data
    assert request.content_type == "image/jpeg"
    assert request.camera_id == "line-3"
    assert request.captured_at == "2026-01-02T02:04:05.000Z"


def test_json_body_that_is_itself_base64_encoded() -> None:
    """A REST API whose binary media types include ``*/*`` base64-encodes JSON too; it must still work."""
    data = image_bytes()
    request = parse_event(v1_event(json_body(data, camera_id="c1"), {"content-type": "application/json"}))
    assert request.image_bytes == data
    assert request.camera_id == "c1"


def test_json_accepts_data_url() -> None:
    data = image_bytes()
    body = json.dumps({"image": "data:image/png;base64," + base64.b64encode(data).decode()})
    request = parse_event(v1_event(body, {"content-type": "application/json"}, base64_encoded=False))
    assert request.image_bytes == data


def test_camera_id_sources_and_precedence() -> None:
    """Path, body and header may each name the camera; when several do they must agree (see
    test_events_hostile.py for the 400 on disagreement)."""
    data = image_bytes()
    from_path = v1_event(data, {"content-type": "image/png"}, path_parameters={"camera_id": "path-cam"})
    assert parse_event(from_path).camera_id == "path-cam"
    agreeing = v1_event(
        data,
        {"content-type": "image/png", "x-camera-id": "path-cam"},
        path_parameters={"camera_id": "path-cam"},
    )
    assert parse_event(agreeing).camera_id == "path-cam"
    header_only = v1_event(data, {"content-type": "image/png", "x-camera-id": "hdr-cam"})
    assert parse_event(header_only).camera_id == "hdr-cam"
    body = json_body(data, camera_id="json-cam")
    json_only = v1_event(body, {"content-type": "application/json"}, base64_encoded=False)
    assert parse_event(json_only).camera_id == "json-cam"
    assert parse_event(v1_event(data, {"content-type": "image/png"})).camera_id == "unknown"


def test_request_id_precedence() -> None:
    data = image_bytes()
    headers = {"content-type": "image/png"}
    assert parse_event(v1_event(data, headers, request_id="ctx")).request_id == "ctx"
    assert parse_event(v1_event(data, {**headers, "x-request-id": "client-1"})).request_id == "client-1"
    both = {**headers, "x-request-id": "client-1", "Idempotency-Key": "idem-1"}
    assert parse_event(v1_event(data, both)).request_id == "idem-1"
    # HTTP API request ids are base64 and end with '='; they are used as-is.
    assert (
        parse_event(v1_event(data, headers, request_id="JFcJxjA5IAMEVqg=")).request_id == "JFcJxjA5IAMEVqg="
    )
    assert parse_event(v1_event(data, {**headers, "x-request-id": "a+b="})).request_id == "a+b="
    # Server-side ids are made key-safe rather than rejected: the client cannot change them.
    assert parse_event(v1_event(data, headers, request_id="a/b c")).request_id == "a_b_c"
    no_ctx = v1_event(data, headers)
    no_ctx["requestContext"].pop("requestId")
    assert parse_event(no_ctx, fallback_request_id="lambda-id").request_id == "lambda-id"
    # A REST request id is a UUID and is used as is.
    uuid_id = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    assert parse_event(v1_event(data, headers, request_id=uuid_id)).request_id == uuid_id


def test_captured_at_defaults_to_now_and_naive_means_utc() -> None:
    data = image_bytes()
    before = datetime.now(UTC)
    request = parse_event(v1_event(data, {"content-type": "image/png"}))
    parsed = datetime.fromisoformat(request.captured_at)
    assert abs((parsed - before).total_seconds()) < 5
    assert normalise_timestamp("2026-03-04T05:06:07") == "2026-03-04T05:06:07.000Z"
    assert normalise_timestamp("2026-03-04T05:06:07.123456Z") == "2026-03-04T05:06:07.123Z"


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height`` (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="GIF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "event,status,code,fragment",
    [
        (v1_event(None, {"content-type": "image/png"}), 400, "empty_body", "empty"),
        (v1_event("", {"content-type": "image/png"}, base64_encoded=False), 400, "empty_body", "empty"),
        (
            v1_event(b"not an image at all", {"content-type": "image/png"}),
            422,
            "invalid_image",
            "JPEG or PNG",
        ),
        (v1_event(image_bytes()[:200], {"content-type": "image/png"}), 422, "invalid_image", "truncated"),
        (v1_event(_gif(), {"content-type": "image/png"}), 415, "unsupported_image_format", "GIF"),
        (
            v1_event(image_bytes(), {"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (v1_event(image_bytes(), {}), 415, "unsupported_media_type", "Content-Type"),
        (
            v1_event("abc", {"content-type": "image/png"}, base64_encoded=False),
            400,
            "binary_body_not_base64",
            "",
        ),
        (
            v1_event("@@@", {"content-type": "image/jpeg"}, base64_encoded=False) | {"isBase64Encoded": True},
            400,
            "invalid_base64",
            "base64",
        ),
        (
            v1_event("{nope", {"content-type": "application/json"}, base64_encoded=False),
            400,
            "invalid_json",
            "",
        ),
        (
            v1_event("[1, 2]", {"content-type": "application/json"}, base64_encoded=False),
            400,
            "invalid_json",
            "",
        ),
        (
            v1_event('{"camera_id": "c"}', {"content-type": "application/json"}, base64_encoded=False),
            400,
            "missing_image",
            "'image'",
        ),
        (
            v1_event('{"image": 5}', {"content-type": "application/json"}, base64_encoded=False),
            400,
            "invalid_base64",
            "'image'",
        ),
        (v1_event(image_bytes(size=(8, 8)), {"content-type": "image/png"}), 422, "image_too_small", "8x8"),
        (
            v1_event(_png_claiming_size(60_000, 60_000), {"content-type": "image/png"}),
            422,
            "image_too_large",
            "too large",
        ),
        (
            v1_event(_png_claiming_size(11_000, 11_000), {"content-type": "image/png"}),
            422,
            "image_too_large",
            "pixels",
        ),
        (
            v1_event(image_bytes(), {"content-type": "image/png", "x-camera-id": "../etc"}),
            400,
            "invalid_camera_id",
            "camera_id",
        ),
        (
            v1_event(image_bytes(), {"content-type": "image/png", "idempotency-key": "a b"}),
            400,
            "invalid_request_id",
            "request_id",
        ),
        (
            v1_event(
                json_body(image_bytes(), captured_at="yesterday"),
                {"content-type": "application/json"},
                base64_encoded=False,
            ),
            400,
            "invalid_captured_at",
            "yesterday",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and value else None,
)
def test_bad_input_maps_to_status(event: dict, status: int, code: str, fragment: str) -> None:
    error = _error(event)
    assert (error.status, error.code) == (status, code), error.message
    assert fragment in error.message


def test_body_over_limit_is_413_binary_and_json() -> None:
    limits = RequestLimits(max_body_bytes=1000)
    big = image_bytes(size=(200, 200), fmt="JPEG")
    assert len(big) > 1000
    assert _error(v1_event(big, {"content-type": "image/png"}), limits).status == 413
    json_event = v1_event(json_body(big), {"content-type": "application/json"}, base64_encoded=False)
    error = _error(json_event, limits)
    assert (error.status, error.code) == (413, "payload_too_large")


def test_missing_camera_id_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUIRE_CAMERA_ID", "true")
    limits = RequestLimits.from_env()
    error = _error(v1_event(image_bytes(), {"content-type": "image/png"}), limits)
    assert (error.status, error.code) == (400, "missing_camera_id")
    ok = parse_event(v1_event(image_bytes(), {"content-type": "image/png", "x-camera-id": "c9"}), limits)
    assert ok.camera_id == "c9"


def test_limits_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "99")
    monkeypatch.setenv("DEFAULT_CAMERA_ID", "fallback")
    limits = RequestLimits.from_env()
    assert (limits.max_body_bytes, limits.max_pixels, limits.default_camera_id) == (1234, 99, "fallback")
    assert not limits.require_camera_id
