"""``tools.local_server``: real HTTP on 127.0.0.1 → API Gateway REST (v1) events → the Lambda handler.

The server runs as ``python -m tools.local_server`` in a subprocess (as a developer runs
it), with storage on the local moto endpoint; requests go through urllib.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from PIL import Image

from config.paths import REPO_ROOT as REPO
from serving.events import parse_event
from tests.conftest import AWS_TEST_ENV
from tools.local_server import build_event, make_server, match_route, spawn, to_http_response

TABLE = "local-server-results"
BUCKET = "local-server-results"


def png_bytes(size: int = 96, colour: tuple[int, int, int] = (90, 90, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def aws_kwargs(endpoint: str) -> dict[str, str]:
    """boto3 client arguments for the moto endpoint (this module does not use ``aws_env``)."""
    return {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    }


@pytest.fixture(scope="module")
def server_url(moto_server: str, serving_model_dir: Path) -> Iterator[str]:
    """Start the local server once for this module against a fresh moto account."""
    env = {**os.environ, **AWS_TEST_ENV, "AWS_ENDPOINT_URL": moto_server}
    env.update(RESULTS_TABLE=TABLE, RESULTS_BUCKET=BUCKET, MODEL_DIR=str(serving_model_dir))
    env["PYTHONPATH"] = str(REPO)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB"):
        env.pop(key, None)
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10)
    from serving.storage import create_resources

    kwargs = aws_kwargs(moto_server)
    create_resources(
        TABLE,
        BUCKET,
        s3_client=boto3.client("s3", **kwargs),
        dynamodb_client=boto3.client("dynamodb", **kwargs),
    )

    with spawn(env=env, cwd=REPO) as server:
        assert server.url.startswith("http://127.0.0.1:"), server.url
        # One page of pipe buffer instead of 64 KiB: if the server's stdout (one handler log line
        # per request) stopped being read, requests would hang after a handful, not after ~100.
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            assert server.process.stdout is not None
            fcntl.fcntl(server.process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        yield server.url


def request(
    url: str, body: bytes | None, headers: dict[str, str], method: str = "POST", timeout: float = 60
) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _lower(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, _lower(err.headers), json.loads(err.read())


def _lower(headers: Any) -> dict[str, str]:
    """Response headers by lower-cased name (HTTP names are case-insensitive)."""
    return {name.lower(): value for name, value in headers.items()}


def test_png_upload_is_scored_and_stored(server_url: str, moto_server: str) -> None:
    status, headers, body = request(
        f"{server_url}/cameras/cam-7/images",
        png_bytes(),
        {"Content-Type": "image/png", "X-Request-Id": "req-png-1"},
    )
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert uuid.UUID(headers["x-amzn-requestid"])  # REST request ids are UUIDs
    assert body["camera_id"] == "cam-7"  # from pathParameters
    assert body["request_id"] == "req-png-1"
    assert body["score"] >= 0.0 and isinstance(body["is_anomalous"], bool)
    assert body["result_uri"].startswith(f"s3://{BUCKET}/")

    kwargs = aws_kwargs(moto_server)
    item = boto3.client("dynamodb", **kwargs).get_item(
        TableName=TABLE, Key={"camera_id": {"S": "cam-7"}, "request_id": {"S": "req-png-1"}}
    )
    assert "Item" in item
    key = body["result_uri"].removeprefix(f"s3://{BUCKET}/")
    overlay = boto3.client("s3", **kwargs).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert overlay.startswith(b"\x89PNG")


def test_json_upload_and_idempotent_replay(server_url: str) -> None:
    payload = json.dumps(
        {"image": base64.b64encode(png_bytes(colour=(200, 10, 10))).decode(), "camera_id": "cam-8"}
    )
    first = request(
        f"{server_url}/cameras/cam-8/images",
        payload.encode(),
        {"Content-Type": "application/json", "Idempotency-Key": "k-1"},
    )
    again = request(
        f"{server_url}/cameras/cam-8/images",
        payload.encode(),
        {"Content-Type": "application/json", "Idempotency-Key": "k-1"},
    )
    assert first[0] == again[0] == 200
    assert first[2] == again[2]
    assert again[1]["x-idempotent-replay"] == "true"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"definitely not a png", {"Content-Type": "image/png"}, 422),
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b'{"camera_id": "cam-1"}', {"Content-Type": "application/json"}, 400),
        (b"\x00\x01", {"Content-Type": "application/octet-stream"}, 415),
        (None, {"Content-Type": "image/png"}, 400),
    ],
)
def test_bad_bodies_are_client_errors(
    server_url: str, body: bytes | None, headers: dict[str, str], status: int
) -> None:
    headers = {**headers, "X-Request-Id": "bad-1"}
    got, _, payload = request(f"{server_url}/cameras/cam-1/images", body or b"", headers)
    assert got == status, payload
    assert payload["error"]["code"]


def test_unknown_route_is_rest_api_gateways_403(server_url: str) -> None:
    """REST API Gateway answers a resource or method it does not have itself, without the function."""
    status, headers, body = request(f"{server_url}/nope", b"x", {"Content-Type": "image/png"})
    assert (status, body) == (403, {"message": "Missing Authentication Token"})
    assert headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    for method in ("GET", "PUT", "DELETE"):
        status, _, body = request(f"{server_url}/cameras/cam-1/images", None, {}, method=method)
        assert (status, body) == (403, {"message": "Missing Authentication Token"}), method


def test_concurrent_requests(server_url: str) -> None:
    def one(i: int) -> int:
        return request(
            f"{server_url}/cameras/cam-c/images",
            png_bytes(64 + i),
            {"Content-Type": "image/png", "X-Request-Id": f"c-{i}"},
        )[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8


def test_many_concurrent_requests_all_succeed(server_url: str) -> None:
    """20 requests from 10 threads, each bounded: none may hang (the benchmark's 10/50-client hang)."""

    def one(i: int) -> int:
        return request(
            f"{server_url}/cameras/cam-many/images",
            png_bytes(64 + i),
            {"Content-Type": "image/png", "X-Request-Id": f"many-{i}"},
            timeout=30,
        )[0]

    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=10)
    futures = [pool.submit(one, i) for i in range(20)]
    _, pending = wait(futures, timeout=90)
    pool.shutdown(wait=False, cancel_futures=True)
    assert not pending, f"{len(pending)} of 20 requests still running after 90 s"
    statuses = [f.result() if f.exception() is None else repr(f.exception()) for f in futures]
    assert statuses == [200] * 20
    assert time.monotonic() - started < 90


def test_request_without_client_id_uses_api_gateway_request_id(server_url: str) -> None:
    """Without a client id the request id is API Gateway's (a UUID for REST APIs)."""
    status, headers, body = request(
        f"{server_url}/cameras/cam-9/images", png_bytes(), {"Content-Type": "image/png"}
    )
    assert status == 200, body
    assert body["request_id"] == headers["x-amzn-requestid"]


# -- event construction (no server) ---------------------------------------------------------


def test_build_event_matches_api_gateway_rest_shape() -> None:
    """Every field of a REST (payload 1.0) proxy event, as API Gateway fills it."""
    resource, params = match_route("POST", "/cameras/line%201/images")  # type: ignore[misc]
    event = build_event(
        method="POST",
        target="/cameras/line%201/images?a=1&a=2&b=",
        headers=[
            ("Content-Type", "image/png"),
            ("X-Thing", "1"),
            ("X-Thing", "2"),
            ("User-Agent", "cam/1.0"),
            (
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/execute-api/aws4_request",
            ),
        ],
        body=b"\x89PNG\r\n",
        resource=resource,
        path_parameters=params,
        source_ip="192.0.2.1",
        host="127.0.0.1:8080",
        request_id="c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
        now=0.0,
        caller_arn="arn:aws:iam::123456789012:user/visual-inspection/cameras/line-1",
    )
    assert set(event) == {
        "resource",
        "path",
        "httpMethod",
        "headers",
        "multiValueHeaders",
        "queryStringParameters",
        "multiValueQueryStringParameters",
        "pathParameters",
        "stageVariables",
        "requestContext",
        "body",
        "isBase64Encoded",
    }
    assert event["resource"] == "/cameras/{camera_id}/images"
    assert event["path"] == "/cameras/line%201/images"  # REST keeps the path as sent
    assert event["httpMethod"] == "POST"
    assert event["pathParameters"] == {"camera_id": "line 1"}  # ... and decodes parameters
    assert event["queryStringParameters"] == {"a": "2", "b": ""}  # last value wins
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": [""]}
    assert event["headers"]["X-Thing"] == "2" and event["multiValueHeaders"]["X-Thing"] == ["1", "2"]
    assert event["headers"]["Content-Type"] == "image/png"  # names as sent
    assert event["headers"]["X-Forwarded-For"] == "192.0.2.1"
    assert event["stageVariables"] is None
    context = event["requestContext"]
    assert context["resourcePath"] == "/cameras/{camera_id}/images"
    assert context["httpMethod"] == "POST"
    assert context["stage"] == "local" and context["path"] == "/local/cameras/line%201/images"
    assert context["requestId"] == "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"
    assert context["extendedRequestId"].endswith("=")
    assert context["requestTimeEpoch"] == 0 and context["requestTime"] == "01/Jan/1970:00:00:00 +0000"
    identity = context["identity"]
    assert identity["sourceIp"] == "192.0.2.1" and identity["userAgent"] == "cam/1.0"
    assert identity["accessKey"] == "AKIDEXAMPLE"
    assert identity["userArn"] == "arn:aws:iam::123456789012:user/visual-inspection/cameras/line-1"
    assert event["isBase64Encoded"] is True  # image/png is one of the API's binary media types
    assert base64.b64decode(event["body"]) == b"\x89PNG\r\n"
    bare = build_event(
        method="GET",
        target="/cameras/c/results",
        headers=[],
        body=b"",
        resource="/cameras/{camera_id}/results",
        path_parameters={"camera_id": "c"},
        source_ip="192.0.2.1",
        host="localhost",
    )
    assert bare["queryStringParameters"] is None and bare["multiValueQueryStringParameters"] is None
    assert bare["body"] is None and bare["isBase64Encoded"] is False
    assert bare["requestContext"]["identity"]["userArn"] is None


def test_text_bodies_are_not_base64_and_the_handler_parser_accepts_events() -> None:
    image = base64.b64encode(png_bytes()).decode()
    event = build_event(
        method="POST",
        target="/cameras/cam-1/images",
        headers=[("content-type", "application/json; charset=utf-8"), ("x-request-id", "r-1")],
        body=json.dumps({"image": image}).encode(),
        resource="/cameras/{camera_id}/images",
        path_parameters={"camera_id": "cam-1"},
        source_ip="127.0.0.1",
        host="localhost:8080",
    )
    assert event["isBase64Encoded"] is False
    parsed = parse_event(event)
    assert (parsed.camera_id, parsed.request_id) == ("cam-1", "r-1")
    assert match_route("GET", "/cameras/cam-1/images") is None
    assert match_route("POST", "/cameras/a/b/images") is None


def test_proxy_response_mapping() -> None:
    resp = to_http_response(
        {
            "statusCode": 201,
            "headers": {"x-a": "1"},
            "cookies": ["c=1"],
            "body": base64.b64encode(b"hi").decode(),
            "isBase64Encoded": True,
        }
    )
    assert (resp.status, resp.body) == (201, b"hi")
    assert ("x-a", "1") in resp.headers and ("set-cookie", "c=1") in resp.headers
    plain = to_http_response({"ok": True})
    assert (plain.status, json.loads(plain.body)) == (200, {"ok": True})


def _raw_exchange(
    url: str, data: bytes, *, trickle: float = 0.0, trickle_from: int = 0, timeout: float = 10
) -> bytes:
    """Send ``data`` on a fresh connection (from ``trickle_from`` on byte by byte every ``trickle`` s)
    and read the reply head (empty if the server closed without one)."""
    split = urlsplit(url)
    with socket.create_connection((split.hostname, split.port), timeout=timeout) as sock:
        if trickle:
            sock.sendall(data[:trickle_from])
            for byte in data[trickle_from:]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # the server has answered and closed
                    break
                time.sleep(trickle)
        else:
            sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


@pytest.mark.parametrize(
    "length_headers",
    [
        b"Content-Length: abc\r\n",
        "Content-Length: \u00b2\r\n".encode(),  # '²': str.isdigit() is true, int() raises
        "Content-Length: \u0661\u0662\r\n".encode(),  # Arabic-Indic '12': int() would accept it
        "Content-Length: \uff11\uff12\r\n".encode(),  # full-width '12'
        b"Content-Length: -1\r\n",
        b"Content-Length: 12\r\nContent-Length: 13\r\n",
    ],
    ids=["letters", "superscript", "arabic-indic", "fullwidth", "negative", "conflicting"],
)
def test_bad_content_length_is_400_not_a_dropped_connection(server_url: str, length_headers: bytes) -> None:
    reply = _raw_exchange(
        server_url,
        b"POST /cameras/cam-1/images HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + length_headers
        + b"\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


def test_stalled_and_trickling_uploads_are_cut_off_without_calling_the_handler() -> None:
    """A body that stops arriving gets 408 after the read timeout; a request that trickles in (each
    byte within the read timeout) is cut off by the request's total budget; neither reaches the
    handler, and the server keeps serving."""
    calls: list[dict] = []
    server = make_server(
        lambda event, context: calls.append(event), port=0, quiet=True, read_timeout=0.5, body_timeout=1.5
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    head = (
        b"POST /cameras/cam-1/images HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    try:
        started = time.monotonic()
        stalled = _raw_exchange(url, head + b"x" * 10)
        assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
        assert time.monotonic() - started < 5
        started = time.monotonic()
        body_trickle = _raw_exchange(url, head + b"x" * 40, trickle=0.1, trickle_from=len(head))
        assert body_trickle.startswith(b"HTTP/1.1 408"), body_trickle[:200]
        assert time.monotonic() - started < 5  # the 2 s budget, not the 4 s the bytes would take
        started = time.monotonic()
        head_trickle = _raw_exchange(url, head, trickle=0.1)  # a slow-headers client
        assert head_trickle == b""  # closed mid-headers, as http.server does on a timeout
        assert time.monotonic() - started < 5  # not the 10 s the bytes would take
        assert calls == []
        missing = _raw_exchange(url, b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 403")  # still serving
    finally:
        server.shutdown()
        server.server_close()


def test_path_camera_wins_and_a_different_header_camera_is_400(server_url: str) -> None:
    status, _, body = request(
        f"{server_url}/cameras/cam-A/images",
        png_bytes(),
        {"Content-Type": "image/png", "X-Camera-Id": "cam-B", "X-Request-Id": "spoof-1"},
    )
    assert status == 400 and body["error"]["code"] == "camera_id_mismatch"


def test_get_result_routes_over_http(server_url: str) -> None:
    status, _, posted = request(
        f"{server_url}/cameras/cam-get/images?regions=true",
        png_bytes(colour=(10, 200, 10)),
        {"Content-Type": "image/png", "Idempotency-Key": "get-1", "X-Captured-At": "2026-06-01T00:00:00Z"},
    )
    assert status == 200, posted
    status, _, got = request(
        f"{server_url}/cameras/cam-get/results/get-1?regions=true", None, {}, method="GET"
    )
    assert (status, got) == (200, posted)
    status, _, listing = request(
        f"{server_url}/cameras/cam-get/results?since=2026-01-01", None, {}, method="GET"
    )
    assert status == 200 and [r["request_id"] for r in listing["results"]] == ["get-1"]
    status, _, missing = request(f"{server_url}/cameras/cam-get/results/nope", None, {}, method="GET")
    assert status == 404 and missing["error"]["code"] == "result_not_found"


def test_caller_arn_reaches_the_handler_and_a_camera_cannot_post_for_another(
    aws_resources: str, scorer: Any
) -> None:
    """``--caller-arn`` stands in for IAM auth: the handler's camera rule applies over real HTTP."""
    from serving.events import RequestLimits
    from serving.identity import camera_arn
    from serving.service import InferenceService
    from serving.storage import ResultStore
    from tests.serving.conftest import BUCKET as HANDLER_BUCKET
    from tests.serving.conftest import TABLE as HANDLER_TABLE

    service = InferenceService(scorer, ResultStore(HANDLER_TABLE, HANDLER_BUCKET), RequestLimits())
    server = make_server(service.handle, port=0, quiet=True, caller_arn=camera_arn("123456789012", "cam-1"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = "http://{}:{}".format(*server.server_address[:2])
    try:
        status, _, body = request(f"{url}/cameras/cam-2/images", png_bytes(), {"Content-Type": "image/png"})
        assert (status, body["error"]["code"]) == (403, "forbidden")
        assert boto3.client("dynamodb").scan(TableName=HANDLER_TABLE)["Items"] == []
        status, _, body = request(f"{url}/cameras/cam-1/images", png_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and body["camera_id"] == "cam-1"
        status, _, body = request(f"{url}/cameras/cam-1/results", None, {}, method="GET")
        assert (status, body["error"]["code"]) == (403, "forbidden")
    finally:
        server.shutdown()
        server.server_close()
