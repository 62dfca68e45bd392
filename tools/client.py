"""Camera client for the deployed API: upload an image, signed with AWS SigV4 (the API's IAM auth).

``python -m tools.client part.png --camera cam-1 --url https://<api>.execute-api.<region>.amazonaws.com/<stage>``

Credentials come from the standard AWS chain (environment, profile, instance/IoT role); the
identity needs the stack's ``CameraInvokePolicy``. Every attempt is signed afresh, and retries (on
429, 5xx and connection errors, with backoff) reuse one ``idempotency-key``, so a retried upload
is stored once and answered with the stored result. Needs only the standard library and botocore
(in serving/requirements.txt), so an edge box can run it without the training stack.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

SERVICE = "execute-api"
RETRY_STATUSES = {429, 500, 502, 503, 504}
_REGION_IN_HOST = re.compile(r"\.execute-api\.([a-z0-9-]+)\.amazonaws\.com")


class ClientError(RuntimeError):
    """The upload could not be made (bad input, no credentials); the message says what to do."""


@dataclass(frozen=True)
class Response:
    """HTTP status and decoded JSON body of the API's answer."""

    status: int
    body: dict[str, Any]
    attempts: int


def content_type_of(image: bytes) -> str:
    """``image/png`` or ``image/jpeg`` from the file's magic bytes (the API accepts only these)."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if image.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    raise ClientError(
        "the file is neither PNG nor JPEG: convert it first (the API accepts image/png, image/jpeg)"
    )


def region_from_url(url: str) -> str | None:
    """The region of an ``execute-api`` URL (``None`` for other hosts, e.g. a local server)."""
    found = _REGION_IN_HOST.search(urlsplit(url).netloc)
    return found.group(1) if found else None


def default_credentials() -> Any:
    """Frozen credentials from the standard AWS chain, or a :class:`ClientError` naming the fix."""
    import botocore.session

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise ClientError(
            "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for an identity "
            "with the stack's CameraInvokePolicy"
        )
    return credentials.get_frozen_credentials()


def signed_request(
    method: str, url: str, body: bytes, headers: dict[str, str], *, region: str, credentials: Any
) -> urllib.request.Request:
    """A urllib request carrying exactly the bytes, URL and headers that were signed."""
    aws_request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    SigV4Auth(credentials, SERVICE, region).add_auth(aws_request)
    prepared = aws_request.prepare()
    return urllib.request.Request(
        prepared.url, data=body or None, headers=dict(prepared.headers), method=method
    )


def send_image(
    url: str,
    camera_id: str,
    image: bytes,
    *,
    region: str | None = None,
    credentials: Any = None,
    idempotency_key: str | None = None,
    captured_at: str | None = None,
    retries: int = 3,
    timeout: float = 30.0,
    backoff: float = 0.5,
) -> Response:
    """POST ``image`` to ``<url>/cameras/<camera_id>/images``; retry transient failures."""
    headers = {
        "content-type": content_type_of(image),
        "idempotency-key": idempotency_key or uuid.uuid4().hex,
    }
    region = region or region_from_url(url)
    if not region:
        raise ClientError(f"cannot tell the AWS region from {url!r}: pass --region")
    credentials = credentials or default_credentials()
    endpoint = f"{url.rstrip('/')}/cameras/{quote(camera_id, safe='')}/images"
    if captured_at:
        headers["x-captured-at"] = captured_at
    attempt = 0
    while True:
        attempt += 1
        request = signed_request("POST", endpoint, image, headers, region=region, credentials=credentials)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return Response(reply.status, _json(reply.read()), attempt)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, _json(exc.read())
            if status not in RETRY_STATUSES or attempt > retries:
                return Response(status, body, attempt)
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt > retries:
                raise
        time.sleep(backoff * 2 ** (attempt - 1))


def _json(raw: bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(raw or b"{}")
    except ValueError:
        return {"raw": raw.decode("utf-8", "replace")}
    return decoded if isinstance(decoded, dict) else {"value": decoded}


def main(argv: list[str] | None = None) -> int:
    """CLI: prints the API's JSON answer; 0 on 2xx, 1 otherwise, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m tools.client", description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("--url", required=True, help="the stack's ApiUrl output (…/<stage>/)")
    parser.add_argument("--camera", required=True, help="camera id (letters, digits, . _ : -)")
    parser.add_argument("--region", default=None, help="default: taken from the URL")
    parser.add_argument("--captured-at", default=None, help="ISO 8601 capture time (default: now)")
    parser.add_argument("--idempotency-key", default=None, help="reuse to make a retry safe (default: new)")
    args = parser.parse_args(argv)
    try:
        image = args.image.read_bytes()
        reply = send_image(
            args.url,
            args.camera,
            image,
            region=args.region,
            idempotency_key=args.idempotency_key,
            captured_at=args.captured_at,
        )
    except (ClientError, OSError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(reply.body, indent=2))
    return 0 if 200 <= reply.status < 300 else 1


if __name__ == "__main__":
    raise SystemExit(main())
