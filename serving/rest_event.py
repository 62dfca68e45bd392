"""The API Gateway REST (payload 1.0) proxy event for an HTTP request: the one event builder.

Why in ``serving/``: the Lambda only ever sees these events, and two HTTP front ends build them
for it from plain HTTP - the local server (``tools.local_server``, in front of the handler) and the
edge agent's HTTP API (``edge.httpapi``, in front of :func:`serving.events.parse_event`). Both must
build exactly what API Gateway would send, so that validation, request ids and error codes are the
Lambda's; one writer keeps them from drifting, and ``edge/`` may import ``serving/`` but not
``tools/``.

The event: ``resource`` (the route template) and ``path`` (as sent, percent-encoding kept),
``httpMethod``, ``headers`` (last value of a repeated header) and ``multiValueHeaders``,
``queryStringParameters`` and ``multiValueQueryStringParameters``, decoded ``pathParameters``,
``stageVariables``, ``requestContext`` (``resourcePath``, ``httpMethod``, ``stage``, ``path`` with
the stage, ``requestId``, ``extendedRequestId``, ``identity`` with ``sourceIp``, ``userAgent``,
``userArn``, ``accessKey``, ...) and a body that is base64-encoded (``isBase64Encoded``) exactly
when its content type is one of the API's binary media types
(:data:`serving.events.IMAGE_CONTENT_TYPES`, which infra/ also deploys).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from serving.events import IMAGE_CONTENT_TYPES

ACCOUNT_ID = "123456789012"
API_ID = "local"
STAGE = "local"
BINARY_MEDIA_TYPES = frozenset(IMAGE_CONTENT_TYPES)
_SIGV4_ACCESS_KEY = re.compile(r"Credential=([A-Za-z0-9]+)/")


def api_gateway_request_id() -> str:
    """A REST API request id (``requestContext.requestId``, ``x-amzn-RequestId``): a UUID."""
    return str(uuid.uuid4())


def extended_request_id() -> str:
    """REST's ``extendedRequestId`` (``x-amz-apigw-id``): 14 base64 characters plus ``=``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(10)).decode()[:14] + "="


def is_binary_content(content_type: str | None) -> bool:
    """Whether API Gateway (REST, these binary media types) base64-encodes the body."""
    return bool(content_type) and content_type.split(";")[0].strip().lower() in BINARY_MEDIA_TYPES


def _single_and_multi(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """REST's two views of repeated names: the last value, and every value in order."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for name, value in pairs:
        single[name] = value
        multi.setdefault(name, []).append(value)
    return single, multi


def build_event(
    *,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    resource: str,
    path_parameters: dict[str, str] | None,
    source_ip: str,
    host: str,
    request_id: str | None = None,
    now: float | None = None,
    stage: str = STAGE,
    caller_arn: str | None = None,
    access_key: str | None = None,
) -> dict[str, Any]:
    """The REST API (payload 1.0) proxy event API Gateway sends to Lambda for this request.

    ``caller_arn``/``access_key`` stand in for what IAM auth puts in ``requestContext.identity``.
    """
    split = urlsplit(target)
    now = time.time() if now is None else now
    pairs = list(headers)
    present = {name.lower() for name, _ in pairs}
    port = host.rsplit(":", 1)[1] if ":" in host else "80"
    for name, value in (
        ("X-Forwarded-For", source_ip),
        ("X-Forwarded-Port", port),
        ("X-Forwarded-Proto", "http"),
        ("X-Amzn-Trace-Id", f"Root=1-{int(now):08x}-{secrets.token_hex(12)}"),
    ):
        if name.lower() not in present:
            pairs.append((name, value))
    single_headers, multi_headers = _single_and_multi(pairs)
    single_query, multi_query = _single_and_multi(parse_qsl(split.query, keep_blank_values=True))
    user_agent = next((v for k, v in reversed(pairs) if k.lower() == "user-agent"), None)
    content_type = next((v for k, v in reversed(pairs) if k.lower() == "content-type"), None)
    request_id = request_id or api_gateway_request_id()
    if access_key is None:
        authorization = next((v for k, v in pairs if k.lower() == "authorization"), "")
        found = _SIGV4_ACCESS_KEY.search(authorization)
        access_key = found[1] if found else None
    event: dict[str, Any] = {
        "resource": resource,
        "path": split.path,
        "httpMethod": method,
        "headers": single_headers,
        "multiValueHeaders": multi_headers,
        "queryStringParameters": single_query or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": path_parameters or None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "local",
            "resourcePath": resource,
            "httpMethod": method,
            "extendedRequestId": extended_request_id(),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "path": f"/{stage}{split.path}",
            "accountId": ACCOUNT_ID,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": host.split(".")[0].split(":")[0],
            "requestTimeEpoch": int(now * 1000),
            "requestId": request_id,
            "identity": {
                "cognitoIdentityPoolId": None,
                "accountId": ACCOUNT_ID if caller_arn else None,
                "cognitoIdentityId": None,
                "caller": None,
                "sourceIp": source_ip,
                "principalOrgId": None,
                "accessKey": access_key,
                "cognitoAuthenticationType": None,
                "cognitoAuthenticationProvider": None,
                "userArn": caller_arn,
                "userAgent": user_agent,
                "user": None,
            },
            "domainName": host,
            "apiId": API_ID,
        },
        "body": None,
        "isBase64Encoded": False,
    }
    if body:
        if is_binary_content(content_type):
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
        else:  # text: what does not decode is replaced, as API Gateway passes text bodies
            event["body"] = body.decode("utf-8", errors="replace")
    return event
