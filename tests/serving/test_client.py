"""``tools.client`` against the local API server on 127.0.0.1, in front of the real handler with
storage on moto, behind an IAM-auth gate that checks SigV4 signatures the way API Gateway does:
the signature is recomputed from what actually arrived (method, path, query, signed headers, body)
with the caller's secret key, so a client that signs anything other than what it sends fails.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.conftest import AWS_TEST_ENV
from tests.serving.conftest import TABLE, image_bytes
from tools import client
from tools.local_server import make_server

AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<day>\d{8})/(?P<region>[a-z0-9-]+)/execute-api/"
    r"aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})$"
)
SECRETS = {AWS_TEST_ENV["AWS_ACCESS_KEY_ID"]: AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"]}


def signature_is_valid(event: dict[str, Any], region: str = "us-east-1") -> bool:
    """Recompute the SigV4 signature of the request in a REST ``event`` with the caller's secret key."""
    headers = {name.lower(): value for name, value in (event.get("headers") or {}).items()}
    found = AUTH_RE.match(headers.get("authorization", ""))
    if not found or found["region"] != region or found["key"] not in SECRETS:
        return False
    if "host" not in found["signed"].split(";") or "x-amz-date" not in headers:
        return False
    body = (
        base64.b64decode(event["body"])
        if event.get("isBase64Encoded")
        else (event.get("body") or "").encode()
    )
    pairs = [(k, v) for k, vs in (event.get("multiValueQueryStringParameters") or {}).items() for v in vs]
    query = f"?{urlencode(pairs, quote_via=quote)}" if pairs else ""
    request = AWSRequest(
        method=event["httpMethod"],
        url=f"http://{headers['host']}{event['path']}{query}",
        data=body,
        headers={name: headers[name] for name in found["signed"].split(";")},
    )
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(found["key"], SECRETS[found["key"]]), "execute-api", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return hmac.compare_digest(expected, found["signature"])


def forbidden(message: str) -> dict[str, Any]:
    return {
        "statusCode": 403,
        "headers": {"content-type": "application/json"},
        "body": f'{{"message":"{message}"}}',
    }


@dataclass
class Api:
    """The gated local API: its stage URL, what the gate decided per request, statuses to inject."""

    url: str
    decisions: list[str] = field(default_factory=list)
    inject: list[int] = field(default_factory=list)


@pytest.fixture
def api(aws_resources: str, scorer: Any) -> Iterator[Api]:
    """The local API with an IAM gate in front of the real handler (storage on moto)."""
    from serving.service import InferenceService
    from serving.storage import ResultStore

    service = InferenceService(scorer, ResultStore.from_env())
    state = Api(url="")
    decisions, failures_to_inject = state.decisions, state.inject

    def gate(event: dict[str, Any], context: Any) -> dict[str, Any]:
        if "authorization" not in {name.lower() for name in event.get("headers") or {}}:
            decisions.append("missing")
            return forbidden("Missing Authentication Token")
        if not signature_is_valid(event):
            decisions.append("invalid")
            return forbidden("The request signature we calculated does not match the signature you provided.")
        decisions.append("ok")
        if failures_to_inject:
            return {"statusCode": failures_to_inject.pop(), "body": '{"message":"Service Unavailable"}'}
        return service.handle(event, context)

    server = make_server(gate, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    state.url = f"http://{host}:{port}"  # the local server has no stage prefix
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def stored(camera_id: str) -> list[dict[str, Any]]:
    return boto3.client("dynamodb").query(
        TableName=TABLE,
        KeyConditionExpression="camera_id = :c",
        ExpressionAttributeValues={":c": {"S": camera_id}},
    )["Items"]


def test_signed_upload_is_scored_and_stored(api: Api) -> None:
    url, decisions = api.url, api.decisions
    reply = client.send_image(url, "cam-7", image_bytes(), region="us-east-1", idempotency_key="k-1")
    assert reply.status == 200, reply.body
    assert reply.body["camera_id"] == "cam-7" and reply.body["request_id"] == "k-1"
    assert decisions == ["ok"]
    assert [item["request_id"]["S"] for item in stored("cam-7")] == ["k-1"]


def test_wrong_secret_and_unsigned_requests_are_refused(
    api: Api,
) -> None:
    url, decisions = api.url, api.decisions
    wrong = Credentials(AWS_TEST_ENV["AWS_ACCESS_KEY_ID"], "not-the-secret")
    reply = client.send_image(url, "cam-8", image_bytes(), region="us-east-1", credentials=wrong, retries=0)
    assert reply.status == 403 and "signature" in reply.body["message"]
    request = urllib.request.Request(
        f"{url}/cameras/cam-8/images",
        data=image_bytes(),
        headers={"content-type": "image/png"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403
    assert decisions == ["invalid", "missing"]
    assert stored("cam-8") == []


def test_retry_reuses_the_idempotency_key_and_stores_once(api: Api) -> None:
    url, decisions = api.url, api.decisions
    api.inject.extend([503, 502])  # popped from the end: 502, then 503, then the real answer
    reply = client.send_image(url, "cam-9", image_bytes(seed=3), region="us-east-1", backoff=0.01)
    assert reply.status == 200 and reply.attempts == 3
    assert decisions == ["ok", "ok", "ok"]  # each attempt freshly signed
    items = stored("cam-9")
    assert len(items) == 1 and items[0]["request_id"]["S"] == reply.body["request_id"]


def test_input_checks_name_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never look for credentials on the network
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    assert client.region_from_url("https://abc123.execute-api.eu-west-1.amazonaws.com/prod/") == "eu-west-1"
    assert client.region_from_url("http://127.0.0.1:8080/dev") is None
    gif = tmp_path / "x.gif"
    gif.write_bytes(b"GIF89a....")
    assert (
        client.main([str(gif), "--url", "https://a.execute-api.eu-west-1.amazonaws.com/p", "--camera", "c"])
        == 2
    )
    assert "neither PNG nor JPEG" in capsys.readouterr().err
    png = tmp_path / "x.png"
    png.write_bytes(image_bytes())
    assert client.main([str(png), "--url", "http://127.0.0.1:9/dev", "--camera", "c"]) == 2
    assert "pass --region" in capsys.readouterr().err
    url = "https://a.execute-api.eu-west-1.amazonaws.com/p"
    assert client.main([str(png), "--url", url, "--camera", "c"]) == 2
    assert "no AWS credentials" in capsys.readouterr().err


# -- retry policy and size limit, against a scripted HTTP server on 127.0.0.1 --------------------


@dataclass
class Scripted:
    """A local server answering from ``replies`` (status, headers) in order, recording each request."""

    url: str
    replies: list[tuple[int, dict[str, str]]]
    seen: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    import http.server

    state = Scripted(url="", replies=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            state.seen.append(
                {
                    "path": self.path,
                    "bytes": len(body),
                    "key": self.headers.get("idempotency-key"),
                    "signed": self.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256"),
                }
            )
            status, headers = state.replies.pop(0) if state.replies else (200, {})
            payload = b'{"message":"scripted"}'
            self.send_response(status)
            for name, value in {"content-type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/dev"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


CREDENTIALS = Credentials("AKIDEXAMPLE", "secret")


def _send(api: Scripted, image: bytes | None = None, **kwargs: Any) -> tuple[client.Response, list[float]]:
    slept: list[float] = []
    reply = client.send_image(
        api.url,
        "cam-1",
        image if image is not None else image_bytes(),
        region="us-east-1",
        credentials=CREDENTIALS,
        sleep=slept.append,
        **kwargs,
    )
    return reply, slept


def test_retry_after_is_waited_out_with_jitter_and_the_key_is_kept(scripted: Scripted) -> None:
    scripted.replies = [(429, {"retry-after": "2"}), (503, {"retry-after": "1"}), (200, {})]
    reply, slept = _send(scripted, backoff=0.5)
    assert reply.status == 200 and reply.attempts == 3
    assert 2 <= slept[0] <= 2.5 and 1 <= slept[1] <= 1.5  # never sooner than asked, jitter on top
    assert len({r["key"] for r in scripted.seen}) == 1 and all(r["signed"] for r in scripted.seen)
    assert {r["path"] for r in scripted.seen} == {"/dev/cameras/cam-1/images"}


def test_retry_after_as_an_http_date(scripted: Scripted) -> None:
    import email.utils

    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    scripted.replies = [(503, {"retry-after": later}), (200, {})]
    reply, slept = _send(scripted, backoff=0.1)
    assert reply.status == 200 and 28 <= slept[0] <= 30.1
    assert client.retry_after_seconds("soon") is None and client.retry_after_seconds(None) is None


def test_a_wait_longer_than_the_cap_returns_the_answer(scripted: Scripted) -> None:
    scripted.replies = [(429, {"retry-after": "3600"})]
    reply, slept = _send(scripted)
    assert (reply.status, reply.attempts, slept, len(scripted.seen)) == (429, 1, [], 1)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422])
def test_a_4xx_other_than_429_is_never_retried(scripted: Scripted, status: int) -> None:
    scripted.replies = [(status, {"retry-after": "1"}), (200, {})]
    reply, slept = _send(scripted)
    assert (reply.status, reply.attempts, slept, len(scripted.seen)) == (status, 1, [], 1)


def test_5xx_backoff_is_full_jitter_and_bounded(scripted: Scripted) -> None:
    import random

    scripted.replies = [(502, {})] * 4
    reply, slept = _send(scripted, retries=3, backoff=1.0, rng=random.Random(7))
    assert (reply.status, reply.attempts, len(scripted.seen)) == (502, 4, 4)
    assert len(slept) == 3
    assert all(0 <= delay <= 2**i for i, delay in enumerate(slept))  # within 1, 2, 4 s
    assert len(set(slept)) == 3  # jittered, so throttled cameras do not come back together


def test_an_image_the_api_cannot_deliver_is_refused_before_sending(
    scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.config import MAX_DELIVERABLE_BODY_BYTES

    png = image_bytes()
    largest = png + b"\0" * (MAX_DELIVERABLE_BODY_BYTES - len(png))
    reply, _ = _send(scripted, largest)
    assert reply.status == 200 and scripted.seen[-1]["bytes"] == MAX_DELIVERABLE_BODY_BYTES
    with pytest.raises(client.ClientError, match=r"delivers at most 4,.*downscale or recompress"):
        _send(scripted, largest + b"\0")
    assert len(scripted.seen) == 1  # nothing sent
    big = tmp_path / "big.png"
    big.write_bytes(largest + b"\0")
    assert client.main([str(big), "--url", scripted.url, "--camera", "cam-1", "--region", "us-east-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("client: the image is ") and err.count("\n") == 1
    assert len(scripted.seen) == 1
