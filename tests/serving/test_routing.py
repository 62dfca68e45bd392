"""The handler behind Powertools' REST resolver, driven with REST v1 events, storage on moto.

Routing (404 / 405, never scored), the caller rules of :mod:`serving.identity` (403, nothing
stored, every log line names the caller), hostile input that used to be a 500, and the resolver's
process-wide state under concurrent calls.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from PIL import Image

from core.scoring import Scorer
from serving.events import RequestLimits
from serving.identity import camera_arn
from serving.service import SERVICE_NAME, InferenceService
from serving.storage import ResultStore
from tests.serving.conftest import BUCKET, TABLE, elpv_image_bytes, header, rest_event

ACCOUNT = "123456789012"
READER_ARN = f"arn:aws:iam::{ACCOUNT}:user/operators/alice"
# Words of the libraries and settings behind the service that no client message may carry.
INTERNAL_WORDS = ("Pillow", "PIL", "decompression bomb", "MAX_", "AWS_", "Traceback", "Recursion", "Overflow")


def _service(scorer: Scorer) -> InferenceService:
    return InferenceService(scorer, ResultStore(TABLE, BUCKET, "results/"), RequestLimits())


def _stored() -> tuple[list[dict[str, Any]], list[str]]:
    """Every DynamoDB item and every S3 key: what the requests left behind."""
    items = boto3.client("dynamodb").scan(TableName=TABLE, ConsistentRead=True)["Items"]
    objects = boto3.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return items, [o["Key"] for o in objects]


def _error(response: dict[str, Any]) -> dict[str, Any]:
    return json.loads(response["body"])["error"]


def _png_post(camera: str, key: str, **kwargs: Any) -> dict[str, Any]:
    headers = {"Content-Type": "image/png", "Idempotency-Key": key}
    return rest_event(
        "POST", f"/cameras/{camera}/images", body=elpv_image_bytes(1), headers=headers, **kwargs
    )


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """The records the service's Powertools logger emits (with their ``extra`` fields)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    target = logging.getLogger(SERVICE_NAME)
    target.addHandler(handler)
    try:
        yield records
    finally:
        target.removeHandler(handler)


# -- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status", "code", "allow"),
    [
        ("GET", "/cameras/cam-1/images", 405, "method_not_allowed", "POST"),
        ("PUT", "/cameras/cam-1/images", 405, "method_not_allowed", "POST"),
        ("DELETE", "/cameras/cam-1/results/r-1", 405, "method_not_allowed", "GET"),
        ("POST", "/cameras/cam-1/results", 405, "method_not_allowed", "GET"),
        ("POST", "/cameras/cam-1/score", 404, "not_found", None),
        ("POST", "/images", 404, "not_found", None),
        ("POST", "/cameras/a/b/images", 404, "not_found", None),
        ("GET", "/", 404, "not_found", None),
    ],
)
def test_unknown_routes_are_404_and_wrong_methods_405_and_nothing_is_scored(
    aws_resources: str, scorer: Scorer, method: str, target: str, status: int, code: str, allow: str | None
) -> None:
    """Every non-GET used to be scored as an image; now only the POST route scores."""
    body = elpv_image_bytes(0)
    event = rest_event(method, target, body=body, headers={"Content-Type": "image/png"})
    response = _service(scorer).handle(event, None)
    assert response["statusCode"] == status, response["body"]
    assert _error(response)["code"] == code
    assert header(response, "allow") == allow
    assert _stored() == ([], [])


def test_the_three_routes_are_served_by_method(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    posted = service.handle(_png_post("cam-1", "route-1"), None)
    assert posted["statusCode"] == 200, posted["body"]
    got = service.handle(rest_event("GET", "/cameras/cam-1/results/route-1"), None)
    assert (got["statusCode"], got["body"]) == (200, posted["body"])
    listing = service.handle(rest_event("GET", "/cameras/cam-1/results"), None)
    assert [r["request_id"] for r in json.loads(listing["body"])["results"]] == ["route-1"]


def test_concurrent_calls_each_get_their_own_answer(aws_resources: str, scorer: Scorer) -> None:
    """The resolver keeps the current event process-wide: concurrent calls must not read each other's."""
    service = _service(scorer)
    cameras = [f"cam-{i}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda c: service.handle(_png_post(c, f"k-{c}"), None), cameras))
    bodies = [json.loads(r["body"]) for r in responses]
    assert [(b["camera_id"], b["request_id"]) for b in bodies] == [(c, f"k-{c}") for c in cameras]


# -- caller rules -------------------------------------------------------------------------------


def test_a_camera_posting_for_another_camera_is_403_and_nothing_is_stored(
    aws_resources: str, scorer: Scorer, log_records: list[logging.LogRecord]
) -> None:
    service = _service(scorer)
    event = _png_post("cam-2", "spoof-1", caller_arn=camera_arn(ACCOUNT, "cam-1"), access_key="AKIACAM1")
    response = service.handle(event, None)
    assert response["statusCode"] == 403
    error = _error(response)
    assert error["code"] == "forbidden" and "cam-1" in error["message"]
    assert _stored() == ([], [])
    (line,) = [r for r in log_records if r.getMessage() == "request failed"]
    assert line.caller == camera_arn(ACCOUNT, "cam-1")  # type: ignore[attr-defined]
    assert line.caller_access_key == "AKIACAM1"  # type: ignore[attr-defined]
    assert line.source_ip == "198.51.100.7"  # type: ignore[attr-defined]


def test_a_camera_posting_for_itself_is_served_and_logged_with_its_identity(
    aws_resources: str, scorer: Scorer, log_records: list[logging.LogRecord]
) -> None:
    event = _png_post("cam-1", "own-1", caller_arn=camera_arn(ACCOUNT, "cam-1"), access_key="AKIACAM1")
    response = _service(scorer).handle(event, None)
    assert response["statusCode"] == 200, response["body"]
    items, objects = _stored()
    assert len(items) == 1 and len(objects) == 2
    (line,) = [r for r in log_records if r.getMessage() == "scored"]
    every_phase = {"parse", "decode", "lookup", "score", "preprocess", "inference", "postprocess"}
    every_phase |= {"analyse", "overlay", "s3_put_overlay", "s3_put_mask", "dynamodb_put", "persist", "total"}
    assert set(line.latency_ms) == every_phase  # type: ignore[attr-defined]
    fields = {k: getattr(line, k) for k in ("caller", "caller_access_key", "source_ip")}
    assert fields == {
        "caller": camera_arn(ACCOUNT, "cam-1"),
        "caller_access_key": "AKIACAM1",
        "source_ip": "198.51.100.7",
    }


def test_a_camera_whose_header_names_another_camera_stores_nothing(
    aws_resources: str, scorer: Scorer
) -> None:
    """The path is the camera's own; a header naming another is refused before anything is stored."""
    event = _png_post("cam-1", "hdr-1", caller_arn=camera_arn(ACCOUNT, "cam-1"))
    event["headers"]["X-Camera-Id"] = "cam-2"
    event["multiValueHeaders"]["X-Camera-Id"] = ["cam-2"]
    response = _service(scorer).handle(event, None)
    assert response["statusCode"] in (400, 403)
    assert _stored() == ([], [])


@pytest.mark.parametrize("target", ["/cameras/cam-1/results/r-1", "/cameras/cam-1/results"])
def test_cameras_may_not_read_results_but_readers_may(
    aws_resources: str, scorer: Scorer, target: str
) -> None:
    service = _service(scorer)
    assert service.handle(_png_post("cam-1", "r-1"), None)["statusCode"] == 200
    as_camera = service.handle(rest_event("GET", target, caller_arn=camera_arn(ACCOUNT, "cam-1")), None)
    assert as_camera["statusCode"] == 403 and _error(as_camera)["code"] == "forbidden"
    as_reader = service.handle(rest_event("GET", target, caller_arn=READER_ARN), None)
    assert as_reader["statusCode"] == 200


def test_a_non_camera_principal_is_left_to_iam(aws_resources: str, scorer: Scorer) -> None:
    """An operator may post for any camera: IAM decides what it may call, not the handler."""
    response = _service(scorer).handle(_png_post("cam-9", "op-1", caller_arn=READER_ARN), None)
    assert response["statusCode"] == 200, response["body"]


# -- hostile input (each was a 500 internal_error) ------------------------------------------------


def _json_post(text: str, query: str = "") -> dict[str, Any]:
    return rest_event(
        "POST", f"/cameras/cam-h/images{query}", body=text, headers={"Content-Type": "application/json"}
    )


def _image_field() -> str:
    return base64.b64encode(elpv_image_bytes(0)).decode()


def _nested_token(depth: int) -> str:
    return base64.urlsafe_b64encode(("[" * depth + "]" * depth).encode()).decode().rstrip("=")


def _long_int_token(digits: int) -> str:
    text = '{"camera_id": "cam-h", "request_id": "r", "captured_at": ' + "9" * digits + "}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


HOSTILE: dict[str, tuple[Any, int, str]] = {
    "deeply_nested_json_body": (lambda: _json_post("[" * 100_000 + "]" * 100_000), 400, "invalid_json"),
    "deeply_nested_json_in_an_object": (
        lambda: _json_post('{"image": "x", "camera_id": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        400,
        "invalid_json",
    ),
    "threshold_of_400_digits": (
        lambda: _json_post(f'{{"image": "{_image_field()}", "threshold": {"1" * 400}}}'),
        400,
        "invalid_threshold",
    ),
    "sensitivity_of_400_digits": (
        lambda: _json_post(f'{{"image": "{_image_field()}", "sensitivity": {"7" * 400}}}'),
        400,
        "invalid_sensitivity",
    ),
    "integer_of_5000_digits": (
        lambda: _json_post(f'{{"image": "{_image_field()}", "frame": {"3" * 5000}}}'),
        400,
        "invalid_json",
    ),
    "threshold_of_400_digits_in_the_query": (
        lambda: rest_event(
            "POST",
            f"/cameras/cam-h/images?threshold={'1' * 400}",
            body=elpv_image_bytes(0),
            headers={"Content-Type": "image/png"},
        ),
        400,
        "invalid_threshold",
    ),
    "limit_superscript_two": (
        lambda: rest_event("GET", "/cameras/cam-h/results?limit=%C2%B2"),
        400,
        "invalid_limit",
    ),
    "limit_arabic_indic_digits": (
        lambda: rest_event("GET", "/cameras/cam-h/results?limit=%D9%A1%D9%A2"),
        400,
        "invalid_limit",
    ),
    "next_token_of_deeply_nested_json": (
        lambda: rest_event("GET", f"/cameras/cam-h/results?next_token={_nested_token(600)}"),
        400,
        "invalid_next_token",
    ),
    "next_token_with_a_5000_digit_integer": (
        lambda: rest_event("GET", f"/cameras/cam-h/results?next_token={_long_int_token(5000)}"),
        400,
        "invalid_next_token",
    ),
    "next_token_of_a_megabyte": (
        lambda: rest_event("GET", f"/cameras/cam-h/results?next_token={'A' * 1_000_000}"),
        400,
        "invalid_next_token",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_a_4xx_naming_the_problem(aws_resources: str, scorer: Scorer, name: str) -> None:
    build, status, code = HOSTILE[name]
    response = _service(scorer).handle(build(), None)
    assert response["statusCode"] == status, response["body"][:300]
    error = _error(response)
    assert error["code"] == code
    assert len(error["message"]) < 200  # no echo of a megabyte or of 5,000 digits
    for word in INTERNAL_WORDS:
        assert word not in error["message"], (word, error["message"])
    assert _stored() == ([], [])


def test_a_long_content_type_is_not_echoed_whole(aws_resources: str, scorer: Scorer) -> None:
    event = rest_event(
        "POST", "/cameras/cam-h/images", body=b"x", headers={"Content-Type": "a/" + "b" * 5000}
    )
    response = _service(scorer).handle(event, None)
    assert response["statusCode"] == 415 and len(_error(response)["message"]) < 200


def test_a_12000_px_jpeg_is_scored_at_reduced_scale(aws_resources: str, scorer: Scorer) -> None:
    """96 MP: above Pillow's own 89.5 MP bomb warning, within the 12,000 px per side promised."""
    buffer = io.BytesIO()
    Image.new("L", (12_000, 8_000), 128).save(buffer, format="JPEG", quality=50)
    event = rest_event(
        "POST", "/cameras/cam-big/images", body=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    response = _service(scorer).handle(event, None)
    assert response["statusCode"] == 200, response["body"]
    body = json.loads(response["body"])
    assert (body["image_width"], body["image_height"]) == (12_000, 8_000)
