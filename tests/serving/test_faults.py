"""Stored results stay true under storage faults: a fault proxy sits between the service and moto.

For every fault, after the client's retries (same idempotency key, bounded): every complete
DynamoDB item's objects exist, no object is left without its item, every 200 agrees with what
is stored, and every 5xx is a 503 with Retry-After that names the store and nothing else.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from botocore.config import Config
from PIL import Image

from core.scoring import Scorer, overlay
from serving.events import RequestLimits, parse_event
from serving.identity import Caller
from serving.service import InferenceService, Trace
from serving.storage import IdempotencyConflict, ResultStore
from tests.serving.conftest import BUCKET, TABLE, elpv_image_bytes, header, json_body, rest_event
from tests.serving.fault_proxy import FaultProxy

CAPTURED_AT = "2026-03-04T05:06:07Z"
MAX_CALLS = 4  # the client's own retries (each call also has boto's 2 attempts)
READ_TIMEOUT_S = 2.0
# Longer than both timed-out attempts plus backoff, so the tombstone lands before the late writes.
LATE_WRITE_DELAY_S = 9.0


@pytest.fixture
def proxy(aws_resources: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(aws_resources).start()
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()


def _service(scorer: Scorer, endpoint: str, store_original: bool = False) -> InferenceService:
    """The real service with boto3 clients that go through ``endpoint`` (the proxy)."""
    config = Config(
        connect_timeout=2.0,
        read_timeout=READ_TIMEOUT_S,
        retries={"mode": "standard", "total_max_attempts": 2},
    )
    store = ResultStore(
        TABLE,
        BUCKET,
        "results/",
        store_original=store_original,
        s3_client=boto3.client("s3", endpoint_url=endpoint, config=config),
        dynamodb_client=boto3.client("dynamodb", endpoint_url=endpoint, config=config),
    )
    return InferenceService(scorer, store, RequestLimits())


def _event(image: bytes, key: str, camera: str = "cam-f") -> dict[str, Any]:
    body = json_body(image, captured_at=CAPTURED_AT)
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    return rest_event("POST", f"/cameras/{camera}/images", body=body, headers=headers)


def _objects() -> dict[str, bytes]:
    s3 = boto3.client("s3")
    listing = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def _complete_items() -> dict[tuple[str, str], dict[str, Any]]:
    store = ResultStore(TABLE, BUCKET)  # direct to moto, not through the proxy
    items = boto3.client("dynamodb").scan(TableName=TABLE, ConsistentRead=True)["Items"]
    decoded = [store._decode(i) for i in items]
    return {(i["camera_id"], i["request_id"]): i for i in decoded if i.get("status") != "aborted"}


def assert_consistent(responses: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The three promises: items → objects exist, objects → an item, 200s = stored."""
    items = _complete_items()
    objects = _objects()
    referenced: set[str] = set()
    for item in items.values():
        for kind in ("overlay_key", "mask_key", "original_key"):
            if item.get(kind):
                assert item[kind] in objects, f"item {item['request_id']} points at missing {kind}"
                referenced.add(item[kind])
    orphans = set(objects) - referenced
    assert not orphans, f"objects without an item: {sorted(orphans)}"
    for response in responses:
        if response["statusCode"] != 200:
            continue
        body = json.loads(response["body"])
        item = items.get((body["camera_id"], body["request_id"]))
        assert item is not None, f"200 for {body['request_id']} but nothing stored"
        for field in ("score", "is_anomalous", "threshold", "result_uri", "confidence", "captured_at"):
            assert body[field] == item[field], field
    return items


def _call_until_settled(service: InferenceService, event: dict[str, Any]) -> list[dict[str, Any]]:
    responses = []
    for _ in range(MAX_CALLS):
        response = service.handle(event, None)
        responses.append(response)
        if response["statusCode"] < 500:
            break
    return responses


# (faults, store whose fault it is, expected first status)
SCENARIOS: dict[str, tuple[list[tuple[Any, ...]], str, int]] = {
    "put_response_lost_once": ([("dynamodb:PutItem", "drop_after_write", 1)], "dynamodb", 200),
    "put_response_lost_every_try": ([("dynamodb:PutItem", "drop_after_write", 2)], "dynamodb", 200),
    "put_500_after_write": ([("dynamodb:PutItem", "error_after_write", 2)], "dynamodb", 200),
    "put_503": ([("dynamodb:PutItem", "status_503", 2)], "dynamodb", 503),
    "put_500": ([("dynamodb:PutItem", "status_500", 2)], "dynamodb", 503),
    "put_connection_closed": ([("dynamodb:PutItem", "close_before", 2)], "dynamodb", 503),
    "put_lands_after_timeout": ([("dynamodb:PutItem", "delay", 2, LATE_WRITE_DELAY_S)], "dynamodb", 503),
    "put_lost_and_tombstone_fails": (
        [("dynamodb:PutItem", "drop_after_write", 2), ("dynamodb:UpdateItem", "status_500", 2)],
        "dynamodb",
        503,
    ),
    "put_and_tombstone_never_arrive": (
        [("dynamodb:PutItem", "close_before", 2), ("dynamodb:UpdateItem", "close_before", 2)],
        "dynamodb",
        503,
    ),
    "lookup_500": ([("dynamodb:GetItem", "status_500", 2)], "dynamodb", 503),
    "s3_put_503": ([("s3:PutObject", "status_503", 2)], "s3", 503),
    "s3_put_response_lost": ([("s3:PutObject", "drop_after_write", 2)], "s3", 503),
    "s3_put_and_cleanup_fail": (
        [("s3:PutObject", "error_after_write", 2), ("s3:DeleteObject", "status_500", 2)],
        "s3",
        503,
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_fault_leaves_storage_consistent(name: str, proxy: FaultProxy, scorer: Scorer) -> None:
    faults, store, first_status = SCENARIOS[name]
    for fault in faults:
        proxy.add(*fault[:3], delay_s=fault[3] if len(fault) > 3 else 0.0)
    service = _service(scorer, proxy.url, store_original=True)
    event = _event(elpv_image_bytes(1), key=f"key-{name}")

    responses = _call_until_settled(service, event)
    proxy.wait_idle(timeout=2 * LATE_WRITE_DELAY_S)  # late writes have landed (or been refused)

    assert proxy.fired(), "the fault never fired: the scenario tests nothing"
    statuses = [r["statusCode"] for r in responses]
    assert statuses[0] == first_status, statuses
    assert statuses[-1] == 200, statuses
    for response in responses[:-1]:
        assert response["statusCode"] == 503
        assert header(response, "retry-after") == "1"
        error = json.loads(response["body"])["error"]
        assert error["code"] == f"{store}_error"
        assert error["message"].startswith(store)
        for secret in ("127.0.0.1", BUCKET, TABLE, "results/", "http"):
            assert secret not in error["message"]
    items = assert_consistent(responses)
    assert list(items) == [("cam-f", f"key-{name}")]
    # The client's answer is the one a later replay gives.
    replay = service.handle(event, None)
    assert replay["statusCode"] == 200 and header(replay, "x-idempotent-replay") == "true"
    assert json.loads(replay["body"]) == json.loads(responses[-1]["body"])
    assert_consistent([replay])


def test_same_key_different_image_is_409_and_stores_nothing(proxy: FaultProxy, scorer: Scorer) -> None:
    service = _service(scorer, proxy.url)
    first = service.handle(_event(elpv_image_bytes(0), key="frame-17"), None)
    assert first["statusCode"] == 200
    before = (_objects(), _complete_items())
    other = service.handle(_event(elpv_image_bytes(5), key="frame-17"), None)
    assert other["statusCode"] == 409
    assert json.loads(other["body"])["error"]["code"] == "idempotency_conflict"
    assert (_objects(), _complete_items()) == before
    # Another camera may use the same key: keys are per camera.
    third = service.handle(_event(elpv_image_bytes(5), key="frame-17", camera="cam-g"), None)
    assert third["statusCode"] == 200
    assert_consistent([first, third])


def _score_and_store(service: InferenceService, event: dict[str, Any]) -> dict[str, Any]:
    """What one Lambda instance does after routing, as a proxy response (200 or 409).

    Lambda runs instances side by side; in one process the resolver serves one event at a time,
    so the race between instances is run on the resolver-free part of the flow.
    """
    try:
        body, _ = service.score_and_store(parse_event(event), Trace(Caller("anonymous")))
    except IdempotencyConflict:
        return {"statusCode": 409}
    return {"statusCode": 200, "body": json.dumps(body)}


def test_concurrent_same_key_two_images_overlay_matches_verdict(aws_resources: str, scorer: Scorer) -> None:
    """Ten concurrent requests, one key, two images: one verdict, and its overlay is its image's."""
    images = [elpv_image_bytes(2), elpv_image_bytes(6)]
    service = _service(scorer, aws_resources)
    for round_ in range(3):
        key = f"race-{round_}"
        events = [_event(images[i % 2], key) for i in range(10)]
        with ThreadPoolExecutor(max_workers=10) as pool:
            responses = list(pool.map(lambda event: _score_and_store(service, event), events))
        statuses = sorted(r["statusCode"] for r in responses)
        assert set(statuses) <= {200, 409}, statuses
        oks = [json.loads(r["body"]) for r in responses if r["statusCode"] == 200]
        assert oks and all(body == oks[0] for body in oks)
        item = _complete_items()[("cam-f", key)]
        winner = next(img for img in images if _sha(img) == item["image_sha256"])
        expected = scorer.score(winner)
        assert item["score"] == expected.score
        stored_overlay = _objects()[item["overlay_key"]]
        assert stored_overlay == overlay(Image.open(io.BytesIO(winner)), expected.anomaly_map)
        assert_consistent(responses)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_tombstone_left_behind_expires_like_an_item(
    proxy: FaultProxy, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose put outcome was unknown and which is never retried leaves only a tombstone.

    With a retention period it carries ``expires_at`` like a complete item, so DynamoDB TTL removes
    it too; without one it would stay in the table for good.
    """
    import time

    monkeypatch.setenv("RESULTS_TTL_DAYS", "30")
    proxy.add("dynamodb:PutItem", "close_before", 2)  # both of boto's attempts: outcome unknown
    service = _service(scorer, proxy.url)
    before = time.time()
    response = service.handle(_event(elpv_image_bytes(3), key="never-retried"), None)
    proxy.wait_idle(timeout=5)

    assert proxy.fired() and response["statusCode"] == 503
    assert _complete_items() == {} and _objects() == {}  # nothing stored but the tombstone
    items = boto3.client("dynamodb").scan(TableName=TABLE, ConsistentRead=True)["Items"]
    assert [i["status"]["S"] for i in items] == ["aborted"]
    expires_at = int(items[0]["expires_at"]["N"])
    assert before + 30 * 86400 - 5 <= expires_at <= time.time() + 30 * 86400 + 5


def test_storage_runs_against_the_lambdas_remaining_time(proxy: FaultProxy, scorer: Scorer) -> None:
    """Every DynamoDB put hangs: the retries stop when one more attempt might outlast the Lambda,
    the answer is a 503 while there is time to give it, and a later retry settles consistently."""
    from tools.local_server import LocalContext

    config = Config(
        connect_timeout=1.0, read_timeout=1.0, retries={"mode": "standard", "total_max_attempts": 6}
    )
    store = ResultStore(
        TABLE,
        BUCKET,
        "results/",
        s3_client=boto3.client("s3", endpoint_url=proxy.url, config=config),
        dynamodb_client=boto3.client("dynamodb", endpoint_url=proxy.url, config=config),
    )
    service = InferenceService(scorer, store, RequestLimits())
    proxy.add("dynamodb:PutItem", "delay", 6, delay_s=3.0)  # each attempt times out after 1 s
    event = _event(elpv_image_bytes(4), key="late-1")
    context = LocalContext(timeout_s=6.0)
    response = service.handle(event, context)
    spare_ms = context.get_remaining_time_in_millis()

    assert proxy.fired()
    assert response["statusCode"] == 503, (response["body"], proxy.fired())
    assert header(response, "retry-after") == "1"
    assert json.loads(response["body"])["error"]["code"] == "dynamodb_error"
    assert spare_ms >= 300, f"answered with only {spare_ms} ms of the Lambda's time left"
    fired_puts = sum(1 for operation, _ in proxy.fired() if operation == "dynamodb:PutItem")
    assert fired_puts < 6, proxy.fired()  # the budget, not boto's attempt limit, ended the retries
    proxy.wait_idle(timeout=15)  # the late puts land
    proxy.clear()

    retry = service.handle(event, LocalContext(timeout_s=30.0))
    proxy.wait_idle(timeout=15)
    assert retry["statusCode"] == 200, retry["body"]
    assert_consistent([retry])


def test_too_little_time_left_starts_no_storage_call(aws_resources: str, scorer: Scorer) -> None:
    """With less time left than one attempt and its backoff may take (2 s connect + 5 s read + 1 s),
    nothing is sent."""
    from tools.local_server import LocalContext

    service = InferenceService(scorer, ResultStore(TABLE, BUCKET, "results/"), RequestLimits())
    response = service.handle(_event(elpv_image_bytes(0), key="short-1"), LocalContext(timeout_s=4.0))
    assert response["statusCode"] == 503
    assert json.loads(response["body"])["error"]["code"] == "dynamodb_error"
    assert _objects() == {} and _complete_items() == {}
    assert boto3.client("dynamodb").scan(TableName=TABLE)["Items"] == []  # not even a tombstone
    ok = service.handle(_event(elpv_image_bytes(0), key="short-1"), LocalContext(timeout_s=29.0))
    assert ok["statusCode"] == 200, ok["body"]
