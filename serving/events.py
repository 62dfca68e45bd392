"""Turn an API Gateway (REST v1, HTTP API v2) or Lambda function URL event into a scoring request.

All input validation lives here so the handler can trust what it gets: every problem with
the request raises :class:`RequestError` carrying the HTTP status and a stable error code,
before any model or storage work is done. Image headers are inspected before pixels are
decoded, so a small file that claims huge dimensions (decompression bomb) is refused cheaply.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools.utilities.data_classes import (
    APIGatewayProxyEvent,
    APIGatewayProxyEventV2,
    LambdaFunctionUrlEvent,
)
from PIL import Image

MB = 1024 * 1024
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
FORMAT_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
JSON_CONTENT_TYPE = "application/json"
# Used as DynamoDB keys and S3 key segments: keep them boring (no '/', no spaces).
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Request ids also allow '=' and '+': API Gateway HTTP API ids are base64 (e.g. "JFcJxjA5IAMEVqg=").
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,127}$")
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:=+-]")


class RequestError(Exception):
    """A client error: maps to a 4xx response ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class RequestLimits:
    """Input limits; defaults fit Lambda (6 MB synchronous payload) and typical inspection cameras."""

    max_body_bytes: int = 6 * MB
    min_side: int = 16
    max_side: int = 12_000
    max_pixels: int = 40_000_000
    require_camera_id: bool = False
    default_camera_id: str = "unknown"

    @classmethod
    def from_env(cls) -> RequestLimits:
        """Read ``MAX_BODY_BYTES``, ``MIN_IMAGE_SIDE``, ``MAX_IMAGE_SIDE``, ``MAX_IMAGE_PIXELS``,
        ``REQUIRE_CAMERA_ID`` and ``DEFAULT_CAMERA_ID``; unset ones keep the defaults."""
        d = cls()
        return cls(
            max_body_bytes=_env_int("MAX_BODY_BYTES", d.max_body_bytes),
            min_side=_env_int("MIN_IMAGE_SIDE", d.min_side),
            max_side=_env_int("MAX_IMAGE_SIDE", d.max_side),
            max_pixels=_env_int("MAX_IMAGE_PIXELS", d.max_pixels),
            require_camera_id=_env_bool("REQUIRE_CAMERA_ID", d.require_camera_id),
            default_camera_id=os.environ.get("DEFAULT_CAMERA_ID") or d.default_camera_id,
        )


@dataclass(frozen=True)
class ScoringRequest:
    """A validated request: decoded image plus the identifiers used to store its result."""

    image: Image.Image
    image_bytes: bytes
    content_type: str  # of the decoded image: image/jpeg or image/png
    camera_id: str
    captured_at: str  # UTC ISO 8601, millisecond precision, "Z" suffix
    request_id: str
    event_source: str  # "apigw-rest-v1" | "apigw-http-v2" | "function-url"


def detect_event_source(event: dict[str, Any]) -> str:
    """Name the event shape; function URLs are v2 payloads whose domain is ``*.lambda-url.*``."""
    if not isinstance(event, dict):
        raise RequestError(400, "unsupported_event", "event must be a JSON object")
    if event.get("version") == "2.0" and "requestContext" in event:
        domain = str((event.get("requestContext") or {}).get("domainName") or "")
        return "function-url" if ".lambda-url." in domain else "apigw-http-v2"
    if "httpMethod" in event or event.get("version") == "1.0":
        return "apigw-rest-v1"
    raise RequestError(400, "unsupported_event", "not an API Gateway or Lambda function URL event")


def _wrap(event: dict[str, Any], source: str) -> APIGatewayProxyEvent | APIGatewayProxyEventV2:
    if source == "function-url":
        return LambdaFunctionUrlEvent(event)
    if source == "apigw-http-v2":
        return APIGatewayProxyEventV2(event)
    return APIGatewayProxyEvent(event)


def _headers(event: dict[str, Any]) -> dict[str, str]:
    """Lower-cased single-value headers (v1 may also carry ``multiValueHeaders``; first wins)."""
    headers: dict[str, str] = {}
    for key, values in (event.get("multiValueHeaders") or {}).items():
        if values:
            headers[key.lower()] = str(values[0])
    for key, value in (event.get("headers") or {}).items():
        if value is not None:
            headers[key.lower()] = str(value)
    return headers


def _b64decode(data: str | bytes, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, "invalid_base64", f"{what} is not valid base64") from exc


def _check_encoded_size(encoded_len: int, limits: RequestLimits) -> None:
    """Refuse oversized base64 before decoding it (decoded size is ~3/4 of the text)."""
    if encoded_len // 4 * 3 > limits.max_body_bytes + 3:
        raise RequestError(413, "payload_too_large", f"image exceeds the {limits.max_body_bytes} byte limit")


def _check_size(data: bytes, limits: RequestLimits) -> None:
    if not data:
        raise RequestError(400, "empty_body", "request body is empty")
    if len(data) > limits.max_body_bytes:
        raise RequestError(
            413, "payload_too_large", f"image is {len(data)} bytes; the limit is {limits.max_body_bytes}"
        )


def normalise_timestamp(value: Any) -> str:
    """Parse ISO 8601 (naive = UTC) and return ``YYYY-MM-DDTHH:MM:SS.mmmZ`` so keys sort by time."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(400, "invalid_captured_at", "captured_at must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise RequestError(400, "invalid_captured_at", f"captured_at {value!r} is not ISO 8601") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Current time in the same format as :func:`normalise_timestamp`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _identifier(value: Any, field: str, pattern: re.Pattern[str] = IDENTIFIER_RE, extra: str = "") -> str:
    text = str(value).strip() if value is not None else ""
    if not pattern.match(text):
        raise RequestError(
            400,
            f"invalid_{field}",
            f"{field} must be 1-128 characters of letters, digits, '.', '_', ':'{extra} or '-'",
        )
    return text


def _server_request_id(value: str) -> str:
    """Ids we did not get from the client cannot be "fixed" by it: make them key-safe, don't reject."""
    return _REQUEST_ID_UNSAFE.sub("_", value.strip())[:128] or uuid.uuid4().hex


def decode_image(data: bytes, limits: RequestLimits) -> tuple[Image.Image, str]:
    """Decode JPEG/PNG bytes into a loaded image after checking its declared dimensions.

    Returns the image and its content type. Dimensions are read from the header first so that a
    decompression bomb is rejected before any pixel memory is allocated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(422, "image_too_large", f"image dimensions are too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(422, "invalid_image", "body is not a decodable JPEG or PNG image") from exc
    if image.format not in FORMAT_CONTENT_TYPES:
        raise RequestError(415, "unsupported_image_format", f"image format {image.format} is not JPEG or PNG")
    width, height = image.size
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise RequestError(
            422,
            "image_too_large",
            f"image is {width}x{height}; limits are {limits.max_side} px per side and "
            f"{limits.max_pixels} pixels",
        )
    if width < limits.min_side or height < limits.min_side:
        raise RequestError(
            422, "image_too_small", f"image is {width}x{height}; each side must be >= {limits.min_side} px"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(422, "invalid_image", "image data is corrupt or truncated") from exc
    return image, FORMAT_CONTENT_TYPES[image.format]


def parse_event(
    event: dict[str, Any],
    limits: RequestLimits | None = None,
    *,
    fallback_request_id: str | None = None,
) -> ScoringRequest:
    """Validate ``event`` and return a :class:`ScoringRequest`, or raise :class:`RequestError`.

    Request id precedence: ``idempotency-key`` header, ``x-request-id`` header (both chosen by the
    client, so a retry keeps them), then ``requestContext.requestId``, then ``fallback_request_id``
    (the Lambda ``aws_request_id``), then a random UUID.
    """
    limits = limits or RequestLimits()
    source = detect_event_source(event)
    wrapped = _wrap(event, source)
    headers = _headers(event)
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()

    body = wrapped.body
    if body is None or body == "":
        raise RequestError(400, "empty_body", "request body is empty")

    json_fields: dict[str, Any] = {}
    if content_type in IMAGE_CONTENT_TYPES:
        if not wrapped.is_base64_encoded:
            raise RequestError(
                400,
                "binary_body_not_base64",
                "binary image bodies must arrive base64-encoded (configure binary media types)",
            )
        _check_encoded_size(len(body), limits)
        image_bytes = _b64decode(body, "request body")
    elif content_type == JSON_CONTENT_TYPE:
        text = body
        if wrapped.is_base64_encoded:
            text = _b64decode(body, "request body").decode("utf-8", errors="replace")
        _check_encoded_size(len(text), limits)
        try:
            json_fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(400, "invalid_json", f"request body is not valid JSON ({exc.msg})") from exc
        if not isinstance(json_fields, dict):
            raise RequestError(400, "invalid_json", "JSON body must be an object")
        encoded = json_fields.get("image")
        if encoded is None or encoded == "":
            raise RequestError(400, "missing_image", "JSON body needs a non-empty 'image' field (base64)")
        if not isinstance(encoded, str):
            raise RequestError(400, "invalid_base64", "'image' must be a base64 string")
        if encoded.startswith("data:") and "," in encoded:  # tolerate data URLs
            encoded = encoded.split(",", 1)[1]
        _check_encoded_size(len(encoded), limits)
        image_bytes = _b64decode(encoded, "'image'")
    elif not content_type:
        raise RequestError(415, "unsupported_media_type", "Content-Type header is required")
    else:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r} is not supported; use image/jpeg, image/png or application/json",
        )
    _check_size(image_bytes, limits)

    path_params = wrapped.path_parameters or {}
    camera_raw = json_fields.get("camera_id") or headers.get("x-camera-id") or path_params.get("camera_id")
    if camera_raw is None or camera_raw == "":
        if limits.require_camera_id:
            raise RequestError(
                400,
                "missing_camera_id",
                "camera_id is required (JSON field, x-camera-id header or path parameter)",
            )
        camera_raw = limits.default_camera_id
    camera_id = _identifier(camera_raw, "camera_id")

    captured_raw = json_fields.get("captured_at") or headers.get("x-captured-at")
    captured_at = normalise_timestamp(captured_raw) if captured_raw else utc_now()

    client_id = headers.get("idempotency-key") or headers.get("x-request-id")
    if client_id:
        request_id = _identifier(client_id, "request_id", REQUEST_ID_RE, ", '=', '+'")
    else:
        context_id = (event.get("requestContext") or {}).get("requestId")
        request_id = _server_request_id(str(context_id or fallback_request_id or uuid.uuid4().hex))

    image, detected_type = decode_image(image_bytes, limits)
    return ScoringRequest(
        image=image,
        image_bytes=image_bytes,
        content_type=detected_type,
        camera_id=camera_id,
        captured_at=captured_at,
        request_id=request_id,
        event_source=source,
    )
