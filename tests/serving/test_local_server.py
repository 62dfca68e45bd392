"""``tools.local_server``: real HTTP on 127.0.0.1 → API Gateway v2 events → the Lambda handler.

The server runs as ``python -m tools.local_server`` in a subprocess (as a developer runs
it), with storage on the local moto endpoint; requests go through urllib.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import boto3
import pytest
from PIL import Image

from config.paths import REPO_ROOT as REPO
from serving.events import parse_event
from tests.conftest import AWS_TEST_ENV
from tools.local_server import build_event, match_route, spawn, to_http_response

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
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_png_upload_is_scored_and_stored(server_url: str, moto_server: str) -> None:
    status, headers, body = request(
        f"{server_url}/cameras/cam-7/images",
        png_bytes(),
        {"Content-Type": "image/png", "X-Request-Id": "req-png-1"},
    )
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert headers["apigw-requestid"].endswith("=")
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


def test_unknown_route_is_api_gateway_404(server_url: str) -> None:
    status, _, body = request(f"{server_url}/nope", b"x", {"Content-Type": "image/png"})
    assert (status, body) == (404, {"message": "Not Found"})
    status, _, body = request(f"{server_url}/cameras/cam-1/images", None, {}, method="GET")
    assert (status, body) == (404, {"message": "Not Found"})


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
    """HTTP API request ids end with '='; the handler must accept them as the request id."""
    status, headers, body = request(
        f"{server_url}/cameras/cam-9/images", png_bytes(), {"Content-Type": "image/png"}
    )
    assert status == 200, body
    assert body["request_id"] == headers["apigw-requestid"]


# -- event construction (no server) ---------------------------------------------------------


def test_build_event_matches_api_gateway_v2_shape() -> None:
    route_key, params = match_route("POST", "/cameras/line%201/images")  # type: ignore[misc]
    event = build_event(
        method="POST",
        target="/cameras/line%201/images?a=1&a=2&b=",
        headers=[("Content-Type", "image/png"), ("X-Thing", "1"), ("x-thing", "2"), ("Cookie", "s=1; t=2")],
        body=b"\x89PNG\r\n",
        route_key=route_key,
        path_parameters=params,
        source_ip="127.0.0.1",
        host="127.0.0.1:8080",
        request_id="AbCdEfGhIjKlMn=",
        now=0.0,
    )
    assert event["version"] == "2.0"
    assert event["routeKey"] == event["requestContext"]["routeKey"] == "POST /cameras/{camera_id}/images"
    assert event["rawPath"] == "/cameras/line%201/images"
    assert event["requestContext"]["http"]["path"] == "/cameras/line 1/images"
    assert event["rawQueryString"] == "a=1&a=2&b="
    assert event["queryStringParameters"] == {"a": "1,2", "b": ""}
    assert event["pathParameters"] == {"camera_id": "line 1"}
    assert event["headers"]["content-type"] == "image/png"
    assert event["headers"]["x-thing"] == "1,2"
    assert "cookie" not in event["headers"] and event["cookies"] == ["s=1", "t=2"]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\x89PNG\r\n"
    assert event["requestContext"]["requestId"] == "AbCdEfGhIjKlMn="
    assert event["requestContext"]["timeEpoch"] == 0
    assert event["requestContext"]["time"] == "01/Jan/1970:00:00:00 +0000"


def test_text_bodies_are_not_base64_and_the_handler_parser_accepts_events() -> None:
    image = base64.b64encode(png_bytes()).decode()
    event = build_event(
        method="POST",
        target="/cameras/cam-1/images",
        headers=[("content-type", "application/json; charset=utf-8"), ("x-request-id", "r-1")],
        body=json.dumps({"image": image}).encode(),
        route_key="POST /cameras/{camera_id}/images",
        path_parameters={"camera_id": "cam-1"},
        source_ip="127.0.0.1",
        host="localhost:8080",
    )
    assert event["isBase64Encoded"] is False
    parsed = parse_event(event)
    assert (parsed.event_source, parsed.camera_id, parsed.request_id) == ("apigw-http-v2", "cam-1", "r-1")
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


def test_bad_content_length_is_400_not_a_dropped_connection(server_url: str) -> None:
    import socket
    from urllib.parse import urlsplit

    split = urlsplit(server_url)
    with socket.create_connection((split.hostname, split.port), timeout=10) as sock:
        sock.sendall(
            b"POST /cameras/cam-1/images HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: abc\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


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
