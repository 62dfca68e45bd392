"""Hostile and edge input to the event parser: bounded decode, camera spoofing, timestamps, options."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image

from serving.events import (
    RequestError,
    RequestLimits,
    memory_pixel_cap,
    parse_event,
)
from tests.serving.conftest import image_bytes, json_body, v1_event


def _error(event: dict, limits: RequestLimits | None = None) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_event(event, limits)
    return info.value


def _tiny_png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of ``width``x``height`` greyscale zeros: kilobytes on the wire."""
    raw = zlib.compress(b"\x00" * (width + 1) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_pixel_cap_follows_function_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory_pixel_cap(None) == 40_000_000
    assert memory_pixel_cap(512) < memory_pixel_cap(1024) < memory_pixel_cap(2048) <= 40_000_000
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    assert RequestLimits.from_env().max_pixels == memory_pixel_cap(1024)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "5000000")  # an explicit cap wins
    assert RequestLimits.from_env().max_pixels == 5_000_000


def test_small_png_claiming_36_megapixels_is_refused_at_2gb(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's 35 KB 6000x6000 PNG: refused from its header on a 2048 MB function."""
    data = _tiny_png_claiming(6000, 6000)
    assert len(data) < 100_000
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048")
    error = _error(v1_event(data, {"content-type": "image/png"}), RequestLimits.from_env())
    assert (error.status, error.code) == (422, "image_too_large")
    assert "6000x6000" in error.message
    assert "MAX_" not in error.message  # limits by value, not by the deployer's variable name


def test_large_png_within_cap_is_reduced_to_the_working_size() -> None:
    data = _tiny_png_claiming(3000, 2000)
    limits = RequestLimits(working_pixels=1_000_000)
    request = parse_event(v1_event(data, {"content-type": "image/png"}), limits)
    assert request.original_size == (3000, 2000)
    assert request.image.width * request.image.height <= 1_000_000
    assert request.image.size == (1000, 667)  # box-reduced by 3 (partial blocks kept)


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    """A 24 MP JPEG over a 10 MP cap is still accepted: draft mode decodes it at 1/4 scale."""
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 4000), (120, 60, 30)).save(buffer, format="JPEG", quality=70)
    limits = RequestLimits(max_pixels=10_000_000, working_pixels=2_000_000, max_body_bytes=20_000_000)
    request = parse_event(v1_event(buffer.getvalue(), {"content-type": "image/jpeg"}), limits)
    assert request.original_size == (6000, 4000)
    assert request.image.size == (1500, 1000)  # DCT scale 1/4: >= the 2 MP working size
    # The same JPEG with no draft room (working size = full size) is over the cap: refused.
    strict = RequestLimits(max_pixels=10_000_000, working_pixels=40_000_000, max_body_bytes=20_000_000)
    assert (
        _error(v1_event(buffer.getvalue(), {"content-type": "image/jpeg"}), strict).code == "image_too_large"
    )


@pytest.mark.parametrize(
    ("path", "header", "body"),
    [("cam-A", "cam-B", None), ("cam-A", None, "cam-B"), (None, "cam-A", "cam-B")],
)
def test_a_second_camera_that_disagrees_is_400(
    path: str | None, header: str | None, body: str | None
) -> None:
    data = image_bytes()
    headers = {"content-type": "application/json"}
    if header:
        headers["x-camera-id"] = header
    fields = {"camera_id": body} if body else {}
    event = v1_event(
        json_body(data, **fields),
        headers,
        base64_encoded=False,
        path_parameters={"camera_id": path} if path else None,
    )
    error = _error(event)
    assert (error.status, error.code) == (400, "camera_id_mismatch")
    assert "cam-A" in error.message and "cam-B" in error.message


@pytest.mark.parametrize(
    "value",
    ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-05:00", 0, "", False, True, 12.5, [], "yesterday"],
)
def test_bad_captured_at_is_400_never_now(value: object) -> None:
    event = v1_event(
        json_body(image_bytes(), captured_at=value),
        {"content-type": "application/json"},
        base64_encoded=False,
    )
    error = _error(event)
    assert (error.status, error.code) == (400, "invalid_captured_at")


def test_captured_at_header_empty_is_400_and_null_field_means_now() -> None:
    error = _error(v1_event(image_bytes(), {"content-type": "image/png", "x-captured-at": ""}))
    assert error.code == "invalid_captured_at"
    body = json.dumps({"image": json.loads(json_body(image_bytes()))["image"], "captured_at": None})
    request = parse_event(v1_event(body, {"content-type": "application/json"}, base64_encoded=False))
    assert request.captured_at.endswith("Z")


def test_extreme_but_valid_captured_at_is_normalised() -> None:
    event = v1_event(
        json_body(image_bytes(), captured_at="0001-01-01T05:00:00+01:00"),
        {"content-type": "application/json"},
        base64_encoded=False,
    )
    assert parse_event(event).captured_at == "0001-01-01T04:00:00.000Z"


def test_threshold_and_sensitivity_overrides() -> None:
    data = image_bytes()
    event = v1_event(data, {"content-type": "image/png"})
    event["queryStringParameters"] = {"threshold": "0.7", "mask": "url", "regions": "true"}
    request = parse_event(event)
    assert (request.threshold, request.sensitivity, request.mask, request.regions) == (0.7, None, "url", True)
    body = json_body(data, sensitivity=0.8, mask=True)
    request = parse_event(v1_event(body, {"content-type": "application/json"}, base64_encoded=False))
    assert (request.threshold, request.sensitivity, request.mask) == (pytest.approx(0.2), 0.8, "base64")
    # The override is part of the fingerprint an idempotency key is bound to.
    plain = parse_event(v1_event(data, {"content-type": "image/png"}))
    assert plain.fingerprint != parse_event(event).fingerprint


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"threshold": "0"}, "invalid_threshold"),
        ({"threshold": "1"}, "invalid_threshold"),
        ({"threshold": "nan"}, "invalid_threshold"),
        ({"threshold": "abc"}, "invalid_threshold"),
        ({"sensitivity": "1.5"}, "invalid_sensitivity"),
        ({"threshold": "0.3", "sensitivity": "0.3"}, "conflicting_threshold"),
        ({"mask": "jpeg"}, "invalid_mask"),
        ({"regions": "maybe"}, "invalid_regions"),
    ],
)
def test_bad_options_are_400(query: dict[str, str], code: str) -> None:
    event = v1_event(image_bytes(), {"content-type": "image/png"})
    event["queryStringParameters"] = query
    error = _error(event)
    assert (error.status, error.code) == (400, code)


def test_png_text_chunk_bomb_is_refused() -> None:
    """A zTXt chunk that inflates past 256 KiB is refused (Pillow's limits, lowered in events)."""
    base = image_bytes(size=(32, 32))
    payload = b"Comment\x00\x00" + zlib.compress(b"A" * 600_000, 9)  # under Pillow's 1 MB default
    chunk = struct.pack(">I", len(payload) - 0) + b"zTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    bomb = base[:33] + chunk + base[33:]  # right after IHDR
    assert len(bomb) < 50_000
    error = _error(v1_event(bomb, {"content-type": "image/png"}))
    assert error.status == 422 and error.code in {"invalid_image", "image_too_large"}


@pytest.mark.parametrize("field", ["threshold", "sensitivity"])
@pytest.mark.parametrize(
    "value",
    [10**400, 10**5000, -(10**400), float("inf")],
    ids=["400-digits", "5001-digits", "negative", "inf"],
)
def test_numbers_beyond_float_range_are_400_and_not_echoed(field: str, value: object) -> None:
    """``float()`` of a 400-digit int raises OverflowError and ``repr`` of a 5,000-digit one raises
    ValueError: both must end as the option's 400, with a short message."""
    from serving.events import parse_answer_options

    with pytest.raises(RequestError) as info:
        parse_answer_options({field: value}, {})
    assert (info.value.status, info.value.code) == (400, f"invalid_{field}")
    assert len(info.value.message) < 120
