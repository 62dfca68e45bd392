"""Storage and the Lambda handler against a real local AWS endpoint (moto server over HTTP)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError
from PIL import Image

from config.paths import REPO_ROOT as REPO
from core.answer import analyse, confidence, mask_png
from core.scoring import Scorer, overlay
from serving.events import RequestLimits, parse_event
from serving.identity import Caller
from serving.service import InferenceService, Trace
from serving.storage import ResultRecord, ResultStore, StorageError, create_resources
from tests.serving.conftest import BUCKET, TABLE, elpv_image_bytes, header, json_body, rest_event
from tools.local_server import LocalContext


def _objects() -> dict[str, bytes]:
    s3 = boto3.client("s3")
    try:
        listing = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    except s3.exceptions.NoSuchBucket:
        return {}
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def _items() -> list[dict[str, Any]]:
    dynamodb = boto3.client("dynamodb")
    try:
        return dynamodb.scan(TableName=TABLE)["Items"]
    except dynamodb.exceptions.ResourceNotFoundException:
        return []


def _service(scorer: Scorer, **store_kwargs: Any) -> InferenceService:
    store = ResultStore(TABLE, BUCKET, "results/", **store_kwargs)
    return InferenceService(scorer, store, RequestLimits())


def _png_event(
    image: bytes, request_id: str = "req-1", camera: str = "cam-1", headers: dict[str, str] | None = None
) -> dict:
    headers = {"Content-Type": "image/png", **(headers or {})}
    return rest_event("POST", f"/cameras/{camera}/images", body=image, headers=headers, request_id=request_id)


def _body(response: dict) -> dict:
    assert header(response, "content-type") == "application/json"
    return json.loads(response["body"])


# -- storage ------------------------------------------------------------------------------------


def _record(**overrides: Any) -> ResultRecord:
    values: dict[str, Any] = {
        "camera_id": "cam-1",
        "request_id": "r-1",
        "captured_at": "2026-02-03T04:05:06.789Z",
        "score": 0.123456789,
        "is_anomalous": False,
        "threshold": 0.5,
        "model_name": "padim",
        "model_version": "3",
        "latency_ms": {"parse": 1.5, "score": 2.25},
        "image_width": 300,
        "image_height": 300,
    }
    values.update(overrides)
    return ResultRecord(**values)


def test_save_writes_s3_then_dynamodb(aws_resources: str) -> None:
    store = ResultStore(TABLE, BUCKET, "results/", store_original=True)
    outcome = store.save(
        _record(),
        b"overlay-bytes",
        mask_png=b"mask",
        original=b"jpeg-bytes",
        original_content_type="image/jpeg",
    )
    assert not outcome.replayed
    attempt = outcome.item["attempt_id"]
    base = f"results/cam-1/2026/02/03/r-1/{attempt}"
    assert _objects() == {
        f"{base}-overlay.png": b"overlay-bytes",
        f"{base}-mask.png": b"mask",
        f"{base}-original.jpg": b"jpeg-bytes",
    }
    stored = store.get("cam-1", "r-1")
    assert stored == outcome.item
    assert stored is not None
    assert stored["score"] == 0.123456789
    assert stored["result_uri"] == f"s3://{BUCKET}/{base}-overlay.png"
    assert stored["original_uri"] == f"s3://{BUCKET}/{base}-original.jpg"
    assert stored["mask_key"] == f"{base}-mask.png"
    assert stored["latency_ms"] == {"parse": 1.5, "score": 2.25}
    assert stored["status"] == "complete"
    raw = _items()[0]
    assert raw["score"] == {"N": "0.123456789"}
    assert raw["is_anomalous"] == {"BOOL": False}
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key=f"{base}-overlay.png")
    assert head["ContentType"] == "image/png"


def test_concurrent_duplicate_returns_winner_and_keeps_its_objects(aws_resources: str) -> None:
    store = ResultStore(TABLE, BUCKET)
    first = store.save(_record(fingerprint="f1"), b"winner")
    # Same request id and fingerprint, any capture day: the loser's objects must go, the winner's stay.
    second = store.save(
        _record(captured_at="2026-02-04T00:00:00.000Z", score=0.9, fingerprint="f1"), b"loser"
    )
    assert second.replayed
    assert second.item == first.item
    third = store.save(_record(fingerprint="f1"), b"other attempt, same day")
    assert third.replayed
    assert _objects() == {first.item["overlay_key"]: b"winner"}
    assert len(_items()) == 1


def test_duplicate_with_another_fingerprint_is_a_conflict(aws_resources: str) -> None:
    from serving.storage import IdempotencyConflict

    store = ResultStore(TABLE, BUCKET)
    first = store.save(_record(fingerprint="f1"), b"winner")
    with pytest.raises(IdempotencyConflict):
        store.save(_record(fingerprint="f2", score=0.9), b"intruder")
    assert _objects() == {first.item["overlay_key"]: b"winner"}
    assert store.get("cam-1", "r-1") == first.item


class _Killed(BaseException):
    """The process dies here (Lambda timeout, kill -9): no ``except`` of the writer runs."""


def _die_at_put(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """This store's next attempt writes its S3 objects, then dies before its DynamoDB put."""

    def killed(**_: Any) -> None:
        raise _Killed

    monkeypatch.setattr(store.dynamodb, "put_item", killed)


def test_replay_sweeps_objects_of_an_attempt_that_died_after_its_s3_puts(
    aws_resources: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stores the item; B (started before A's item existed) dies between its S3 puts and its put;
    C replays: B's objects, which no item references and no later save sees, are swept."""
    first = ResultStore(TABLE, BUCKET).save(_record(fingerprint="f1"), b"A overlay", mask_png=b"A mask")
    dying = ResultStore(TABLE, BUCKET)
    _die_at_put(dying, monkeypatch)
    with pytest.raises(_Killed):
        dying.save(_record(fingerprint="f1", score=0.9), b"B overlay", mask_png=b"B mask")
    a_objects = {first.item["overlay_key"]: b"A overlay", first.item["mask_key"]: b"A mask"}
    assert len(_objects()) == 4 and set(_objects()) > set(a_objects)  # B's objects, without an item

    replayed = ResultStore(TABLE, BUCKET).lookup("cam-1", "r-1", "f1")
    assert replayed == first.item
    assert _objects() == a_objects
    assert len(_items()) == 1 and ResultStore(TABLE, BUCKET).get("cam-1", "r-1") == first.item


def test_lookup_of_another_fingerprint_is_a_conflict_and_sweeps_nothing(aws_resources: str) -> None:
    from serving.storage import IdempotencyConflict

    store = ResultStore(TABLE, BUCKET)
    first = store.save(_record(fingerprint="f1"), b"A overlay")
    stray = store.object_keys("cam-1", first.item["captured_at"], "r-1", "dead-attempt")["overlay"]
    boto3.client("s3").put_object(Bucket=BUCKET, Key=stray, Body=b"B overlay")
    with pytest.raises(IdempotencyConflict):
        store.lookup("cam-1", "r-1", "f2")
    assert store.lookup("cam-1", "r-unknown", "f1") is None
    assert set(_objects()) == {first.item["overlay_key"], stray}


def test_dynamodb_failure_removes_s3_objects(aws_env: str) -> None:
    boto3.client("s3").create_bucket(Bucket=BUCKET)  # no table
    store = ResultStore(TABLE, BUCKET, store_original=True)
    with pytest.raises(StorageError) as info:
        store.save(_record(), b"overlay", original=b"png", original_content_type="image/png")
    assert info.value.store == "dynamodb"
    assert "ResourceNotFoundException" in str(info.value)
    assert _objects() == {}


def test_s3_failure_writes_nothing_to_dynamodb(aws_env: str) -> None:
    create_resources(TABLE, "other-bucket")
    store = ResultStore(TABLE, BUCKET)
    with pytest.raises(StorageError) as info:
        store.save(_record(), b"overlay")
    assert info.value.store == "s3"
    assert "NoSuchBucket" in str(info.value)
    assert _items() == []


def test_from_env_requires_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.storage import ConfigurationError

    monkeypatch.delenv("RESULTS_TABLE", raising=False)
    monkeypatch.delenv("RESULTS_BUCKET", raising=False)
    with pytest.raises(ConfigurationError, match="RESULTS_TABLE, RESULTS_BUCKET"):
        ResultStore.from_env()


# -- handler ------------------------------------------------------------------------------------


def test_handler_scores_and_persists_byte_for_byte(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer, store_original=True)
    data = elpv_image_bytes(4)
    event = rest_event(
        "POST",
        "/cameras/line-2/images",
        body=json_body(data, camera_id="line-2", captured_at="2026-05-06T07:08:09Z"),
        headers={"Content-Type": "application/json"},
        request_id="gw-1",
    )
    assert event["isBase64Encoded"] is False  # JSON is not a binary media type: passed as text
    response = service.handle(event, None)
    assert response["statusCode"] == 200, response
    assert header(response, "x-idempotent-replay") == "false"
    body = _body(response)
    (item,) = _items()
    base = f"results/line-2/2026/05/06/gw-1/{item['attempt_id']['S']}"
    expected = scorer.score(data)
    image = Image.open(io.BytesIO(data))
    analysis = analyse(scorer.map_to_image(expected.anomaly_map, image), 0.5, image.size, image.size)
    assert body == {
        "score": expected.score,
        "is_anomalous": expected.is_anomalous,
        "confidence": confidence(expected.score, 0.5),
        "threshold": 0.5,
        "threshold_source": "model",
        "sensitivity": None,
        "anomalous_area_pct": analysis.anomalous_area_pct,
        "model_name": "padim",
        "model_version": scorer.metadata.registry_version,
        "result_uri": f"s3://{BUCKET}/{base}-overlay.png",
        "request_id": "gw-1",
        "camera_id": "line-2",
        "captured_at": "2026-05-06T07:08:09.000Z",
        "image_width": 300,
        "image_height": 300,
    }
    expected_overlay = overlay(image, scorer.map_to_image(expected.anomaly_map, image))
    assert _objects() == {
        f"{base}-overlay.png": expected_overlay,
        f"{base}-mask.png": mask_png(analysis.mask),
        f"{base}-original.png": data,
    }
    assert item["camera_id"] == {"S": "line-2"}
    assert item["request_id"] == {"S": "gw-1"}
    assert float(item["score"]["N"]) == expected.score
    assert item["is_anomalous"] == {"BOOL": expected.is_anomalous}
    assert item["model_version"] == {"S": scorer.metadata.registry_version}
    assert set(item["latency_ms"]["M"]) == {"parse", "score", "analyse", "overlay"}
    assert item["overlay_key"] == {"S": f"{base}-overlay.png"}


def test_retried_request_stores_nothing_twice(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    data = elpv_image_bytes(2)
    headers = {"Idempotency-Key": "client-key-1"}
    event = _png_event(data, "gw-first", headers=headers)
    first = service.handle(event, None)
    objects_before = _objects()
    retry = _png_event(data, "gw-second", headers=headers)  # API Gateway gives retries a new id
    second = service.handle(retry, None)
    assert second["statusCode"] == 200
    assert header(second, "x-idempotent-replay") == "true"
    assert second["body"] == first["body"]
    assert _body(first)["request_id"] == "client-key-1"
    assert _objects() == objects_before
    assert len(objects_before) == 2  # overlay + mask
    assert len(_items()) == 1


def test_handler_replay_sweeps_objects_of_an_attempt_that_died_after_its_s3_puts(
    aws_resources: str, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the handler: A stores, B dies after its S3 puts, C (a retry) is answered from A's item
    and leaves only A's objects."""
    data = elpv_image_bytes(2)
    headers = {"Idempotency-Key": "key-abc", "X-Captured-At": "2026-02-03T04:05:06Z"}
    first = _service(scorer).handle(_png_event(data, "gw-a", headers=headers), None)
    assert first["statusCode"] == 200 and header(first, "x-idempotent-replay") == "false"
    a_objects = _objects()
    (a_item,) = _items()

    b_service = _service(scorer)
    monkeypatch.setattr(b_service.store, "get", lambda *_: None)  # B looked up before A stored
    _die_at_put(b_service.store, monkeypatch)
    b_request = parse_event(_png_event(data, "gw-b", headers=headers), RequestLimits())
    with pytest.raises(_Killed):
        b_service.score_and_store(b_request, Trace(Caller(arn="anonymous")))
    assert len(_objects()) == 2 * len(a_objects) and _items() == [a_item]

    third = _service(scorer).handle(_png_event(data, "gw-c", headers=headers), None)
    assert third["statusCode"] == 200 and header(third, "x-idempotent-replay") == "true"
    assert third["body"] == first["body"]
    assert _objects() == a_objects
    assert _items() == [a_item]


def test_handler_bad_request_is_json_4xx_and_stores_nothing(aws_resources: str, scorer: Scorer) -> None:
    response = _service(scorer).handle(_png_event(b"garbage"), None)
    assert response["statusCode"] == 422
    assert _body(response)["error"]["code"] == "invalid_image"
    response = _service(scorer).handle({"hello": "world"}, None)
    assert response["statusCode"] == 400
    assert _body(response)["error"]["code"] == "unsupported_event"
    response = _service(scorer).handle({"Records": []}, None)  # an SQS/S3 event: not API Gateway
    assert (response["statusCode"], _body(response)["error"]["code"]) == (400, "unsupported_event")
    assert _objects() == {} and _items() == []


def test_bucket_missing_is_5xx_and_no_dynamodb_item(aws_env: str, scorer: Scorer) -> None:
    create_resources(TABLE, "some-other-bucket")
    response = _service(scorer).handle(_png_event(elpv_image_bytes(0)), None)
    assert response["statusCode"] == 500
    error = _body(response)["error"]
    assert error["code"] == "s3_error"
    assert error["message"] == "s3 failed; the result was not stored"  # no bucket name, no endpoint
    assert error["request_id"] == "req-1"
    assert _items() == []


def test_table_missing_is_5xx_and_no_s3_object(aws_env: str, scorer: Scorer) -> None:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    response = _service(scorer).handle(_png_event(elpv_image_bytes(0)), None)
    assert response["statusCode"] == 500
    assert _body(response)["error"]["code"] == "dynamodb_error"
    assert _objects() == {}


def test_dynamodb_down_after_s3_write_leaves_no_s3_object(aws_resources: str, scorer: Scorer) -> None:
    """The lookup succeeds, S3 is written, then DynamoDB becomes unreachable for the put."""
    service = _service(scorer, store_original=True)

    def unreachable(**_: Any) -> None:
        raise EndpointConnectionError(endpoint_url=aws_resources)

    service.store.dynamodb.meta.events.register("before-send.dynamodb.PutItem", unreachable)
    response = service.handle(_png_event(elpv_image_bytes(1)), None)
    assert response["statusCode"] == 503
    assert _body(response)["error"]["code"] == "dynamodb_error"
    assert _objects() == {}
    assert _items() == []


def test_server_down_is_503(aws_env: str, scorer: Scorer, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    response = _service(scorer).handle(_png_event(elpv_image_bytes(0)), None)
    assert response["statusCode"] == 503
    error = _body(response)["error"]
    assert error["code"] == "dynamodb_error"
    assert error["message"].startswith("dynamodb is temporarily unavailable")
    assert str(port) not in response["body"]
    assert header(response, "retry-after") == "1"


def test_module_handler_from_env(aws_resources: str, serving_model_dir: Path, monkeypatch) -> None:
    """``serving.app.handler`` builds everything at import from the environment."""
    monkeypatch.setenv("MODEL_DIR", str(serving_model_dir))
    monkeypatch.delitem(sys.modules, "serving.app", raising=False)
    import serving.app as app

    monkeypatch.delitem(sys.modules, "serving.app")  # later imports rebuild from their own env
    response = app.handler(_png_event(elpv_image_bytes(3), request_id="mod-1"), LocalContext())
    assert response["statusCode"] == 200, response
    assert _body(response)["result_uri"].startswith(f"s3://{BUCKET}/results/cam-1/")
    assert len(_items()) == 1


def test_serving_imports_no_torch(serving_model_dir: Path) -> None:
    env = {
        **os.environ,
        "MODEL_DIR": str(serving_model_dir),
        "RESULTS_TABLE": TABLE,
        "RESULTS_BUCKET": BUCKET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    code = (
        "import sys, serving.app;"
        "bad = sorted(m for m in ('torch', 'torchvision', 'anomalib', 'lightning', 'matplotlib', 'cv2')"
        " if m in sys.modules);"
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_a_minimal_rest_event_is_served(aws_resources: str, scorer: Scorer) -> None:
    """Only the fields a hand-written REST event carries (as tests/infra sends): no identity, query
    or multi-value fields, no context; the handler needs none of them."""
    import base64

    event = {
        "resource": "/cameras/{camera_id}/images",
        "path": "/cameras/line-1-cam-2/images",
        "httpMethod": "POST",
        "headers": {"content-type": "image/png"},
        "multiValueHeaders": {"content-type": ["image/png"]},
        "pathParameters": {"camera_id": "line-1-cam-2"},
        "requestContext": {"requestId": "req-0001", "stage": "full", "httpMethod": "POST"},
        "body": base64.b64encode(elpv_image_bytes(2)).decode(),
        "isBase64Encoded": True,
    }
    response = _service(scorer).handle(event)
    assert response["statusCode"] == 200, response["body"]
    body = _body(response)
    assert (body["camera_id"], body["request_id"]) == ("line-1-cam-2", "req-0001")
