"""Camera client for the deployed API: upload an image, signed with AWS SigV4 (the API's IAM auth).

``python -m tools.client part.png --camera cam-1 --url https://<api>.execute-api.<region>.amazonaws.com/<stage>``

Credentials come from the standard AWS chain (environment, profile, instance/IoT role, or the file
``python -m infra.cameras add`` wrote: ``AWS_SHARED_CREDENTIALS_FILE=<file>``); the identity is a
camera user with the stack's ``CameraWriterPolicy``, which may post only as its own camera id.

Retries: every attempt is signed afresh and reuses one ``idempotency-key``, so a retried upload is
stored once and answered with the stored result. Retried are 429 (the stage throttle: "come back
later"), 5xx and connection errors; any other 4xx is the request's own fault (auth, camera id,
size, conflict) and is returned at once, never repeated. A ``Retry-After`` (seconds or HTTP date)
is waited out plus jitter; otherwise exponential backoff with full jitter, so many cameras throttled
together do not come back in step. An image larger than the API can deliver to the function is
refused before it is sent: API Gateway would answer it with a gateway error, not a 413.

Needs only the standard library and botocore (in serving/requirements.txt), so an edge box can run
it without the training stack.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import random
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

from infra.config import MAX_DELIVERABLE_BODY_BYTES

SERVICE = "execute-api"
# 429 is the stage throttle (or the handler's "busy"): the one 4xx that means "later", not "wrong".
RETRY_STATUSES = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 60.0  # a server asking for a longer wait gets its answer returned instead
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
            "with the stack's CameraWriterPolicy (see python -m infra.cameras add)"
        )
    return credentials.get_frozen_credentials()


def check_size(image: bytes, limit: int = MAX_DELIVERABLE_BODY_BYTES) -> None:
    """Refuse an image the API cannot hand to the function (Lambda's 6 MB payload after base64)."""
    if len(image) > limit:
        raise ClientError(
            f"the image is {len(image):,} bytes; the API delivers at most {limit:,} "
            "(Lambda's 6 MB payload after base64): downscale or recompress it"
        )


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), ``None`` if absent/invalid."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(attempt: int, retry_after: float | None, *, backoff: float, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``: the server's ``Retry-After`` plus up to ``backoff`` of
    jitter, else full-jitter exponential backoff (uniform in ``[0, backoff * 2**(attempt-1)]``)."""
    if retry_after is not None:
        return retry_after + rng.uniform(0, backoff)
    return rng.uniform(0, backoff * 2 ** (attempt - 1))


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
    max_retry_after: float = MAX_RETRY_AFTER_S,
    max_body_bytes: int = MAX_DELIVERABLE_BODY_BYTES,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Response:
    """POST ``image`` to ``<url>/cameras/<camera_id>/images``; retry 429/5xx/connection failures only."""
    check_size(image, max_body_bytes)
    rng = rng or random.Random()
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
        retry_after = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return Response(reply.status, _json(reply.read()), attempt)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, _json(exc.read())
            retry_after = retry_after_seconds(exc.headers.get("retry-after"))
            too_long = retry_after is not None and retry_after > max_retry_after
            if status not in RETRY_STATUSES or attempt > retries or too_long:
                return Response(status, body, attempt)
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt > retries:
                raise
        sleep(retry_delay(attempt, retry_after, backoff=backoff, rng=rng))


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
