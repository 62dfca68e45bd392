"""Turn an API Gateway REST (v1 proxy) event into a validated request: the one parser of the event.

All input validation lives here so the handler can trust what it gets: every problem with
the request raises :class:`RequestError` carrying the HTTP status and a stable error code,
before any model or storage work is done. Hostile input (deep JSON nesting, numbers too large for
a float or too long for ``int``, non-ASCII digits, oversized echoes) is a 4xx naming the problem,
never a 500; messages quote at most a short prefix of what the client sent and never a
library's wording or a configuration variable's name. Image headers are inspected before pixels are
decoded, so a small file that claims huge dimensions (decompression bomb) is refused cheaply,
and decode memory is bounded: the pixel cap follows the function's memory size
(``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``), large JPEGs are decoded at a reduced DCT scale (draft
mode) and anything still above the working size is box-reduced before scoring.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEvent
from PIL import Image, PngImagePlugin

MB = 1024 * 1024
IMAGE_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG"}
FORMAT_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
JSON_CONTENT_TYPE = "application/json"
# Used as DynamoDB keys and S3 key segments: keep them boring (no '/', no spaces).
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Request ids also allow '=' and '+': clients use base64 ids (e.g. "JFcJxjA5IAMEVqg=", like API Gateway's
# extendedRequestId); REST request ids are UUIDs.
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:=+-]{0,127}$")
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:=+-]")
# Bytes of decode-time memory budgeted per decoded pixel: the decoded buffer (up to 4 bands), the
# RGB copy the model input is made from, the box-reduced working image and Pillow's overhead,
# with headroom for the runtime and the ONNX session that share the function's memory.
DECODE_BYTES_PER_PIXEL = 64
DEFAULT_MAX_PIXELS = 40_000_000
# PNG text chunks (tEXt/zTXt/iTXt) are decompressed by Pillow; a zTXt bomb is bounded by these.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1 * MB
# Per-request decision threshold / sensitivity overrides must stay inside these bounds: the
# model's scores are min-max normalised to [0, 1], so 0 or 1 would flag everything or nothing.
OVERRIDE_MIN = 0.01
OVERRIDE_MAX = 0.99
MASK_MODES = ("base64", "url")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_PAGE_LIMIT_RE = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit() accepts '²'
MAX_PAGE_TOKEN_CHARS = 2048  # a real token is ~200 characters
_ECHO_CHARS = 40  # how much of a client's value an error message quotes


class RequestError(Exception):
    """A client error: maps to a 4xx response ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def shown(value: Any) -> str:
    """A client's value as an error message may quote it: strings cut short, other types by name.

    Why: echoing input verbatim lets a 1 MB header or a 4,000-digit number into every log line and
    response (and ``repr`` of an int over 4,300 digits raises).
    """
    if isinstance(value, str):
        return repr(value[:_ECHO_CHARS] + ("..." if len(value) > _ECHO_CHARS else ""))
    if value is None or isinstance(value, bool | float):
        return repr(value)
    return "an integer" if isinstance(value, int) else f"a JSON {type(value).__name__}"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in _TRUE


def memory_pixel_cap(memory_mb: int | None) -> int:
    """Largest decoded image (pixels) this function's memory can afford; 40 MP when unknown."""
    if not memory_mb or memory_mb <= 0:
        return DEFAULT_MAX_PIXELS
    return min(DEFAULT_MAX_PIXELS, memory_mb * MB // DECODE_BYTES_PER_PIXEL)


@dataclass(frozen=True)
class RequestLimits:
    """Input limits; defaults fit Lambda (6 MB synchronous payload) and typical inspection cameras."""

    max_body_bytes: int = 6 * MB
    min_side: int = 16
    max_side: int = 12_000
    max_pixels: int = DEFAULT_MAX_PIXELS  # of the decoded image (after JPEG draft scaling)
    working_pixels: int = 4_000_000  # images above this are reduced before scoring and overlay
    require_camera_id: bool = False
    default_camera_id: str = "unknown"
    max_results_page: int = 100  # GET .../results?limit=
    mask_url_expires_s: int = 900  # lifetime of presigned mask URLs (mask=url)

    @classmethod
    def from_env(cls) -> RequestLimits:
        """Read the serving limits from the environment (the one place that does); unset keep defaults.

        ``MAX_BODY_BYTES``, ``MIN_IMAGE_SIDE``, ``MAX_IMAGE_SIDE``, ``MAX_IMAGE_PIXELS`` (default:
        sized to ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``, see :func:`memory_pixel_cap`),
        ``MAX_WORKING_PIXELS``, ``REQUIRE_CAMERA_ID``, ``DEFAULT_CAMERA_ID``, ``MAX_RESULTS_PAGE``,
        ``MASK_URL_EXPIRES_S``.
        """
        d = cls()
        memory_cap = memory_pixel_cap(_env_int("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", 0))
        return cls(
            max_body_bytes=_env_int("MAX_BODY_BYTES", d.max_body_bytes),
            min_side=_env_int("MIN_IMAGE_SIDE", d.min_side),
            max_side=_env_int("MAX_IMAGE_SIDE", d.max_side),
            max_pixels=_env_int("MAX_IMAGE_PIXELS", memory_cap),
            working_pixels=_env_int("MAX_WORKING_PIXELS", d.working_pixels),
            require_camera_id=_env_bool("REQUIRE_CAMERA_ID", d.require_camera_id),
            default_camera_id=os.environ.get("DEFAULT_CAMERA_ID") or d.default_camera_id,
            max_results_page=_env_int("MAX_RESULTS_PAGE", d.max_results_page),
            mask_url_expires_s=_env_int("MASK_URL_EXPIRES_S", d.mask_url_expires_s),
        )


@dataclass(frozen=True)
class ScoringRequest:
    """A validated request: decoded image plus the identifiers used to store its result.

    ``image`` is the working image (possibly reduced from ``original_size``); positions reported
    to the client are scaled back to ``original_size``.
    """

    image: Image.Image
    image_bytes: bytes
    content_type: str  # of the decoded image: image/jpeg or image/png
    camera_id: str
    captured_at: str  # UTC ISO 8601, millisecond precision, "Z" suffix
    request_id: str
    original_size: tuple[int, int] = (0, 0)
    image_sha256: str = ""
    threshold: float | None = None  # per-request override (from threshold or sensitivity)
    sensitivity: float | None = None
    mask: str | None = None  # None | "base64" | "url"
    regions: bool = False
    decode_ms: float = 0.0  # of the parse, the part spent decoding (and reducing) the image

    @property
    def fingerprint(self) -> str:
        """What an idempotency key is bound to: camera, image bytes and the answer-changing params.

        The same key with another fingerprint is a conflict, never a replay of someone else's answer.
        """
        threshold = "" if self.threshold is None else repr(self.threshold)
        text = f"{self.camera_id}\n{self.image_sha256}\n{threshold}"
        return hashlib.sha256(text.encode()).hexdigest()


def as_rest_event(event: Mapping[str, Any] | APIGatewayProxyEvent) -> APIGatewayProxyEvent:
    """``event`` as Powertools' REST v1 proxy event; anything that is not a JSON object is a 400."""
    if isinstance(event, APIGatewayProxyEvent):
        return event
    if not isinstance(event, Mapping):
        raise RequestError(400, "unsupported_event", "event must be a JSON object")
    return APIGatewayProxyEvent(dict(event))


def is_rest_event(event: Any) -> bool:
    """Whether ``event`` has the fields the REST resolver routes on (``httpMethod`` and ``path``)."""
    return (
        isinstance(event, Mapping)
        and isinstance(event.get("httpMethod"), str)
        and isinstance(event.get("path"), str)
    )


def request_headers(event: APIGatewayProxyEvent) -> dict[str, str]:
    """Lower-cased single-value headers: ``headers`` (REST keeps the last of a repeated header),
    else the first of ``multiValueHeaders`` (an event may carry only that)."""
    headers: dict[str, str] = {}
    for key, values in (event.get("multiValueHeaders") or {}).items():
        if values:
            headers[str(key).lower()] = str(values[0])
    for key, value in (event.get("headers") or {}).items():
        if value is not None:
            headers[str(key).lower()] = str(value)
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


def normalise_timestamp(value: Any, field: str = "captured_at") -> str:
    """Parse ISO 8601 (naive = UTC) and return ``YYYY-MM-DDTHH:MM:SS.mmmZ`` so keys sort by time.

    Years 1 and 9999 with an offset overflow when moved to UTC: that is the client's input, a 400.
    """
    if not isinstance(value, str) or not value.strip():
        raise RequestError(
            400, f"invalid_{field}", f"{field} must be an ISO 8601 string such as 2026-01-02T03:04:05Z"
        )
    try:
        parsed = datetime.fromisoformat(value.strip())
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        utc = parsed.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise RequestError(
            400, f"invalid_{field}", f"{field} {shown(value)} is not an ISO 8601 time in years 1-9999"
        ) from exc
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Current time in the same format as :func:`normalise_timestamp`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate_identifier(
    value: Any, field: str, pattern: re.Pattern[str] = IDENTIFIER_RE, extra: str = ""
) -> str:
    """``value`` as a key-safe identifier (DynamoDB key, S3 key segment), else 400 ``invalid_<field>``."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**128:
        value = str(value)  # a JSON number as camera id: allowed, as the text it spells
    text = value.strip() if isinstance(value, str) else ""
    if not pattern.fullmatch(text):
        raise RequestError(
            400,
            f"invalid_{field}",
            f"{field} must be 1-128 characters of letters, digits, '.', '_', ':'{extra} or '-'",
        )
    return text


def _server_request_id(value: str) -> str:
    """Ids we did not get from the client cannot be "fixed" by it: make them key-safe, don't reject."""
    return _REQUEST_ID_UNSAFE.sub("_", value.strip())[:128] or uuid.uuid4().hex


def _too_large(
    limits: RequestLimits, size: tuple[int, int] | None = None, decoded: tuple[int, int] | None = None
) -> RequestError:
    """The one ``image_too_large`` message: the image's size against this service's limits."""
    what = f"image is {size[0]}x{size[1]}" if size else "image dimensions are too large"
    scaled = f" (decodes at {decoded[0]}x{decoded[1]})" if decoded and decoded != size else ""
    return RequestError(
        422,
        "image_too_large",
        f"{what}{scaled}; limits are {limits.max_side} px per side and {limits.max_pixels} decoded "
        "pixels (JPEGs decode at a reduced scale); send a smaller image",
    )


def decode_image(data: bytes, limits: RequestLimits) -> tuple[Image.Image, str, tuple[int, int]]:
    """Decode JPEG/PNG bytes with bounded memory; return (working image, content type, original size).

    Dimensions are read from the header first, so a decompression bomb is rejected before any
    pixel memory is allocated. A JPEG larger than ``limits.working_pixels`` is decoded at the
    smallest DCT scale (1/2, 1/4, 1/8) that still covers the working size, which cuts decode
    memory and time by the square of the factor; the pixel cap applies to what is decoded. A
    decoded image above the working size is box-reduced by an integer factor, so scoring and
    overlay memory do not grow with the camera's resolution.
    """
    try:
        # Pillow's own bomb warning (89.5 MP) would refuse a 12,000 px JPEG that draft mode decodes
        # at 1/4 scale; the side and decoded-pixel checks below are this service's bomb limits.
        # Pillow's hard error (twice that) stays as a backstop for absurd headers.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
    except Image.DecompressionBombError as exc:
        raise _too_large(limits) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(422, "invalid_image", "body is not a decodable JPEG or PNG image") from exc
    if image.format not in FORMAT_CONTENT_TYPES:
        raise RequestError(415, "unsupported_image_format", f"image format {image.format} is not JPEG or PNG")
    content_type = FORMAT_CONTENT_TYPES[image.format]
    width, height = image.size
    if width < limits.min_side or height < limits.min_side:
        raise RequestError(
            422, "image_too_small", f"image is {width}x{height}; each side must be >= {limits.min_side} px"
        )
    if width > limits.max_side or height > limits.max_side:
        raise _too_large(limits, (width, height))
    if image.format == "JPEG" and width * height > limits.working_pixels:
        shrink = math.sqrt(limits.working_pixels / (width * height))
        target = (max(limits.min_side, int(width * shrink)), max(limits.min_side, int(height * shrink)))
        image.draft(None, target)  # keeps the mode (L, RGB, CMYK); scales by 1/2, 1/4 or 1/8
    decoded = image.size
    if decoded[0] * decoded[1] > limits.max_pixels:
        raise _too_large(limits, (width, height), decoded)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestError(422, "invalid_image", "image data is corrupt or truncated") from exc
    pixels = image.width * image.height
    if pixels > limits.working_pixels:
        factor = math.ceil(math.sqrt(pixels / limits.working_pixels))
        try:
            image = image.reduce(factor)
        except ValueError:  # modes reduce() does not support (e.g. I;16): same box filter via resize
            size = (max(1, image.width // factor), max(1, image.height // factor))
            image = image.resize(size, Image.Resampling.BOX)
    return image, content_type, (width, height)


def query_parameters(event: Mapping[str, Any]) -> dict[str, str]:
    """Single-value query parameters (REST puts the last of a repeated key in ``queryStringParameters``)."""
    return {str(k): str(v) for k, v in (event.get("queryStringParameters") or {}).items() if v is not None}


def _flag(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RequestError(400, f"invalid_{field}", f"{field} must be true or false")


def _fraction(value: Any, field: str) -> float:
    """A threshold / sensitivity override: a number within [OVERRIDE_MIN, OVERRIDE_MAX]."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError(400, f"invalid_{field}", f"{field} must be a number")
    try:
        number = float(value)
    except (ValueError, OverflowError) as exc:  # OverflowError: an integer beyond float range
        raise RequestError(
            400,
            f"invalid_{field}",
            f"{field} must be a number between {OVERRIDE_MIN} and {OVERRIDE_MAX}, got {shown(value)}",
        ) from exc
    if not (OVERRIDE_MIN <= number <= OVERRIDE_MAX):  # also false for NaN
        raise RequestError(
            400,
            f"invalid_{field}",
            f"{field} must be between {OVERRIDE_MIN} and {OVERRIDE_MAX}, got {shown(value)}",
        )
    return number


def _canonical(value: Any) -> str | None:
    """A scalar option as the query string would spell it (to compare body and query); else None."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, float) or (isinstance(value, int) and abs(value) < 10**64):
        return str(value)
    return None


def _option(json_fields: dict[str, Any], query: dict[str, str], name: str) -> Any:
    """A request option from the JSON body or the query string; both and different is a 400."""
    in_body, in_query = name in json_fields and json_fields[name] is not None, name in query
    if in_body and in_query and _canonical(json_fields[name]) != query[name].lower():
        raise RequestError(
            400, f"conflicting_{name}", f"{name} differs between the body and the query string"
        )
    return json_fields[name] if in_body else query.get(name)


def parse_answer_options(
    json_fields: dict[str, Any], query: dict[str, str]
) -> tuple[float | None, float | None, str | None, bool]:
    """``(threshold, sensitivity, mask, regions)`` from body/query; sensitivity s means threshold 1 - s."""
    raw_threshold = _option(json_fields, query, "threshold")
    raw_sensitivity = _option(json_fields, query, "sensitivity")
    if raw_threshold is not None and raw_sensitivity is not None:
        raise RequestError(400, "conflicting_threshold", "give threshold or sensitivity, not both")
    threshold = sensitivity = None
    if raw_threshold is not None:
        threshold = _fraction(raw_threshold, "threshold")
    if raw_sensitivity is not None:
        sensitivity = _fraction(raw_sensitivity, "sensitivity")
        threshold = round(1.0 - sensitivity, 6)
    raw_mask = _option(json_fields, query, "mask")
    mask: str | None = None
    if raw_mask is not None and not isinstance(raw_mask, bool | str):
        raise RequestError(400, "invalid_mask", "mask must be 'base64', 'url' or false")
    if raw_mask is not None and not (isinstance(raw_mask, bool) and not raw_mask):
        text = "base64" if raw_mask is True else str(raw_mask).strip().lower()
        if text in _TRUE:
            text = "base64"
        if text in _FALSE - {""} or text == "none":
            text = ""
        if text and text not in MASK_MODES:
            raise RequestError(400, "invalid_mask", "mask must be 'base64', 'url' or false")
        mask = text or None
    raw_regions = _option(json_fields, query, "regions")
    regions = False if raw_regions is None else _flag(raw_regions, "regions")
    return threshold, sensitivity, mask, regions


def _camera_id(
    path_params: Mapping[str, Any],
    json_fields: dict[str, Any],
    headers: dict[str, str],
    limits: RequestLimits,
) -> str:
    """The path's camera wins; a different camera in the body or header is a 400, never a re-route."""
    sources = [
        ("path", path_params.get("camera_id")),
        ("body", json_fields.get("camera_id")),
        ("x-camera-id header", headers.get("x-camera-id")),
    ]
    present = [(where, value) for where, value in sources if value not in (None, "")]
    given = [(where, validate_identifier(value, "camera_id")) for where, value in present]
    if not given:
        if limits.require_camera_id:
            raise RequestError(
                400,
                "missing_camera_id",
                "camera_id is required (JSON field, x-camera-id header or path parameter)",
            )
        return validate_identifier(limits.default_camera_id, "camera_id")
    first_where, camera = given[0]
    for where, other in given[1:]:
        if other != camera:
            raise RequestError(
                400,
                "camera_id_mismatch",
                f"camera_id {other!r} in the {where} differs from {camera!r} in the {first_where}",
            )
    return camera


def _json_object(text: str) -> dict[str, Any]:
    """The JSON body as an object; malformed, too deeply nested or too-long numbers are a 400."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(400, "invalid_json", f"request body is not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise RequestError(400, "invalid_json", "request body is nested too deeply") from exc
    except ValueError as exc:  # an integer literal over Python's 4,300-digit conversion limit
        raise RequestError(400, "invalid_json", "request body holds a number with too many digits") from exc
    if not isinstance(fields, dict):
        raise RequestError(400, "invalid_json", "JSON body must be an object")
    return fields


def parse_event(
    event: Mapping[str, Any] | APIGatewayProxyEvent,
    limits: RequestLimits | None = None,
    *,
    path_parameters: Mapping[str, str] | None = None,
    fallback_request_id: str | None = None,
) -> ScoringRequest:
    """Validate a ``POST .../images`` event into a :class:`ScoringRequest`, or raise :class:`RequestError`.

    Request id precedence: ``idempotency-key`` header, ``x-request-id`` header (both chosen by the
    client, so a retry keeps them), then ``requestContext.requestId``, then ``fallback_request_id``
    (the Lambda ``aws_request_id``), then a random UUID. ``path_parameters`` (decoded) replace the
    event's when given (the resolver's route match for an event that names none).
    """
    limits = limits or RequestLimits()
    wrapped = as_rest_event(event)
    headers = request_headers(wrapped)
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
        json_fields = _json_object(text)
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
            f"Content-Type {shown(content_type)} is not supported; use image/jpeg, image/png or "
            "application/json",
        )
    _check_size(image_bytes, limits)

    params = wrapped.path_parameters if path_parameters is None else path_parameters
    camera_id = _camera_id(params, json_fields, headers, limits)

    # Absent means "now"; present but empty/0/false is a client mistake, not "now".
    if json_fields.get("captured_at") is not None:
        captured_at = normalise_timestamp(json_fields["captured_at"])
    elif "x-captured-at" in headers:
        captured_at = normalise_timestamp(headers["x-captured-at"])
    else:
        captured_at = utc_now()
    threshold, sensitivity, mask, regions = parse_answer_options(json_fields, query_parameters(wrapped))

    client_id = headers.get("idempotency-key") or headers.get("x-request-id")
    if client_id:
        request_id = validate_identifier(client_id, "request_id", REQUEST_ID_RE, ", '=', '+'")
    else:
        context_id = (wrapped.get("requestContext") or {}).get("requestId")
        request_id = _server_request_id(str(context_id or fallback_request_id or uuid.uuid4().hex))

    started = time.perf_counter()
    image, detected_type, original_size = decode_image(image_bytes, limits)
    decode_ms = (time.perf_counter() - started) * 1000.0
    return ScoringRequest(
        image=image,
        image_bytes=image_bytes,
        content_type=detected_type,
        camera_id=camera_id,
        captured_at=captured_at,
        request_id=request_id,
        original_size=original_size,
        image_sha256=hashlib.sha256(image_bytes).hexdigest(),
        threshold=threshold,
        sensitivity=sensitivity,
        mask=mask,
        regions=regions,
        decode_ms=decode_ms,
    )


@dataclass(frozen=True)
class ResultQuery:
    """``GET /cameras/{camera_id}/results/{request_id}``: which stored answer, presented how."""

    camera_id: str
    request_id: str
    mask: str | None = None
    regions: bool = False


@dataclass(frozen=True)
class ListQuery:
    """``GET /cameras/{camera_id}/results``: one page of a camera's answers by ``captured_at``."""

    camera_id: str
    since: str | None
    until: str | None
    limit: int
    next_token: str | None
    mask: str | None = None
    regions: bool = False


def _presentation(query: dict[str, str]) -> tuple[str | None, bool]:
    """``mask`` and ``regions`` of a GET (threshold/sensitivity do not apply to stored answers)."""
    _, _, mask, regions = parse_answer_options(
        {}, {k: v for k, v in query.items() if k in ("mask", "regions")}
    )
    return mask, regions


def parse_result_query(
    event: Mapping[str, Any] | APIGatewayProxyEvent, path_parameters: Mapping[str, str] | None = None
) -> ResultQuery:
    """Validate a ``GET .../results/{request_id}`` event."""
    wrapped = as_rest_event(event)
    params = wrapped.path_parameters if path_parameters is None else path_parameters
    camera_id = validate_identifier(params.get("camera_id"), "camera_id")
    request_id = validate_identifier(params.get("request_id"), "request_id", REQUEST_ID_RE, ", '=', '+'")
    mask, regions = _presentation(query_parameters(wrapped))
    return ResultQuery(camera_id, request_id, mask, regions)


def parse_list_query(
    event: Mapping[str, Any] | APIGatewayProxyEvent,
    limits: RequestLimits,
    path_parameters: Mapping[str, str] | None = None,
) -> ListQuery:
    """Validate a ``GET .../results`` event: time range, page size, page token, presentation."""
    wrapped = as_rest_event(event)
    params = wrapped.path_parameters if path_parameters is None else path_parameters
    camera_id = validate_identifier(params.get("camera_id"), "camera_id")
    query = query_parameters(wrapped)
    mask, regions = _presentation(query)
    if mask == "base64":
        raise RequestError(400, "invalid_mask", "lists return masks as URLs only: use mask=url")
    since = normalise_timestamp(query["since"], "since") if "since" in query else None
    until = normalise_timestamp(query["until"], "until") if "until" in query else None
    token = query.get("next_token") or None
    if token is not None and len(token) > MAX_PAGE_TOKEN_CHARS:
        raise RequestError(400, "invalid_next_token", "next_token is not a token this API issued")
    return ListQuery(
        camera_id,
        since,
        until,
        _page_limit(query.get("limit"), limits.max_results_page),
        token,
        mask,
        regions,
    )


def _page_limit(raw: str | None, maximum: int) -> int:
    """``limit`` as ASCII digits from 1 to ``maximum`` (``int('²')`` would raise after ``isdigit()``)."""
    if raw is None or raw == "":
        return min(50, maximum)
    if not _PAGE_LIMIT_RE.fullmatch(raw) or not (1 <= int(raw) <= maximum):
        raise RequestError(400, "invalid_limit", f"limit must be an integer from 1 to {maximum}")
    return int(raw)
