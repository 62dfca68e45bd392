"""The agent's HTTP API: the cloud's routes and answers, plus /status, /metrics and /healthz.

Why the same routes: a camera (or the vi-client) can point at the cloud or at the agent without
changing anything. ``POST /cameras/{camera_id}/images`` is turned into the API Gateway v2 event
the Lambda would get and parsed by :func:`serving.events.parse_event` - the Lambda's own
validation, error codes and idempotency keys (``Idempotency-Key`` / ``X-Request-Id``). The answer
is built from the same :data:`serving.service.RESPONSE_FIELDS`. A replay (same key, same image)
returns the stored answer; the same key with another image is 409.

Policy *when scoring falls behind*: the request is refused at once with ``429`` and
``Retry-After`` (never queued without bound); when the outbox cap is reached, ``507`` with
``Retry-After``. Only a result that is durable in the outbox is answered with 200.

Differences from the cloud, stated: ``mask=url`` is answered with a URL on this agent
(``/cameras/{camera_id}/results/{request_id}/mask.png``) rather than a presigned S3 URL, and
``result_uri`` is ``edge://<agent_id>/<camera_id>/<request_id>`` until the result is synced, then the
cloud's ``s3://`` URI.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from edge.config import HttpConfig
from edge.outbox import Entry, OutboxFull
from serving.events import (
    IDENTIFIER_RE,
    REQUEST_ID_RE,
    RequestError,
    normalise_timestamp,
    parse_answer_options,
    parse_event,
    validate_identifier,
)
from serving.routes import RESULT_ROUTE, RESULTS_ROUTE, SCORE_ROUTE, match_route
from serving.service import RESPONSE_FIELDS, error_response, json_response
from serving.storage import IdempotencyConflict

log = logging.getLogger("edge.http")
MAX_REQUEST_BYTES = 10 * 1024 * 1024
WAIT_S = 60.0


def local_uri(agent_id: str, entry: Entry) -> str:
    return f"edge://{agent_id}/{entry.camera_id}/{entry.request_id}"


class EdgeHttpServer:
    """A threading HTTP server on ``http.host:http.port`` bound to one agent."""

    def __init__(self, agent: Any, config: HttpConfig) -> None:
        self.agent = agent
        self.config = config
        handler = type("Handler", (_Handler,), {"agent": agent, "edge": self})
        self.server = ThreadingHTTPServer((config.host, config.port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- answers ----------------------------------------------------------------------------
    def answer(
        self, entry: Entry, mask: str | None, regions: bool, mask_bytes: bytes | None
    ) -> dict[str, Any]:
        """The cloud's answer shape (:data:`serving.service.RESPONSE_FIELDS`) from a local result."""
        item = entry.item(local_uri(self.agent.config.agent_id, entry))
        body = {key: item.get(key) for key in RESPONSE_FIELDS}
        if regions:
            body["regions"] = item.get("regions") or []
        if mask:
            data = mask_bytes if mask_bytes is not None else self.agent.outbox.read_mask(entry)
            if data is None:
                body["mask"] = None  # evicted under the disk cap after it was synced
            elif mask == "url":
                body["mask"] = {
                    "format": "png",
                    "url": f"/cameras/{entry.camera_id}/results/{entry.request_id}/mask.png",
                    "width": item.get("mask_width"),
                    "height": item.get("mask_height"),
                }
            else:
                body["mask"] = {
                    "format": "png",
                    "base64": base64.b64encode(data).decode(),
                    "width": item.get("mask_width"),
                    "height": item.get("mask_height"),
                }
        return body

    def score(self, event: dict[str, Any]) -> dict[str, Any]:
        """POST /cameras/{camera_id}/images through the agent's queue; a proxy-style response dict."""
        from edge.agent import Job

        request = parse_event(event, self.agent.limits)
        existing = self.agent.outbox.get(request.camera_id, request.request_id)
        if existing is not None:  # replay before queueing, as the Lambda looks up before scoring
            if existing.fingerprint != request.fingerprint:
                raise IdempotencyConflict({})
            body = self.answer(existing, request.mask, request.regions, None)
            return json_response(200, body, {"x-idempotent-replay": "true"})
        finished = threading.Event()
        box: dict[str, Any] = {}

        def done(result: Any) -> None:
            box["result"] = result
            finished.set()

        retry = {"retry-after": str(self.config.retry_after_s)}
        if not self.agent.try_submit(Job(request=request, source="http", done=done)):
            return error_response(429, "busy", "the scorer is behind; retry later", request.request_id, retry)
        if not finished.wait(WAIT_S):
            return error_response(503, "timeout", "the result is not ready; retry with the same key",
                                  request.request_id, retry)  # fmt: skip
        result = box["result"]
        if result.error is not None:
            if isinstance(result.error, OutboxFull):
                return error_response(507, "outbox_full", str(result.error), request.request_id, retry)
            raise result.error
        replayed = "true" if result.replayed else "false"
        body = self.answer(result.entry, request.mask, request.regions, result.mask_png)
        return json_response(200, body, {"x-idempotent-replay": replayed})

    def get(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        """GET one result, a page of results, or a stored mask, from the outbox."""
        mask_route = path.endswith("/mask.png")
        matched = match_route("GET", path[: -len("/mask.png")] if mask_route else path)
        if matched is None:
            return {"statusCode": 404, "headers": {"content-type": "application/json"},
                    "body": json.dumps({"message": "Not Found"})}  # fmt: skip
        route, params = matched
        camera_id = validate_identifier(params.get("camera_id"), "camera_id", IDENTIFIER_RE)
        presentation = {k: v for k, v in query.items() if k in ("mask", "regions")}
        _, _, mask, regions = parse_answer_options({}, presentation)
        if route == " ".join(RESULT_ROUTE):
            request_id = validate_identifier(
                params.get("request_id"), "request_id", REQUEST_ID_RE, ", '=', '+'"
            )
            entry = self.agent.outbox.get(camera_id, request_id)
            if entry is None:
                raise RequestError(404, "result_not_found", f"no stored result for {camera_id}/{request_id}")
            if mask_route:
                data = self.agent.outbox.read_mask(entry)
                if data is None:
                    raise RequestError(404, "mask_not_found", "the mask was evicted after sync")
                return {"statusCode": 200, "headers": {"content-type": "image/png"}, "raw": data}
            return json_response(200, self.answer(entry, mask, regions, None))
        if route != " ".join(RESULTS_ROUTE) or mask_route:
            raise RequestError(404, "not_found", f"no route for GET {path}")
        if mask == "base64":
            raise RequestError(400, "invalid_mask", "lists return masks as URLs only: use mask=url")
        since = normalise_timestamp(query["since"], "since") if "since" in query else None
        until = normalise_timestamp(query["until"], "until") if "until" in query else None
        raw = query.get("limit") or "50"
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise RequestError(400, "invalid_limit", "limit must be an integer from 1 to 100")
        try:
            entries, token = self.agent.outbox.query(
                camera_id,
                since=since,
                until=until,
                limit=int(raw),
                next_token=query.get("next_token") or None,
            )
        except ValueError as exc:
            raise RequestError(400, "invalid_next_token", str(exc)) from exc
        results = [self.answer(e, mask, regions, None) for e in entries]
        return json_response(200, {"camera_id": camera_id, "results": results, "next_token": token})


def build_event(method: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The API Gateway HTTP API (2.0) event the Lambda would get for this request."""
    split = urlsplit(target)
    matched = match_route(method, split.path)
    query: dict[str, str] = {}
    for key, value in parse_qsl(split.query, keep_blank_values=True):
        query[key] = f"{query[key]},{value}" if key in query else value
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": matched[0] if matched else "$default",
        "rawPath": split.path,
        "rawQueryString": split.query,
        "headers": headers,
        "requestContext": {
            "domainName": "edge.local",
            "http": {"method": method, "path": unquote(split.path)},
            "requestId": f"edge-h-{uuid.uuid4().hex}",
        },
        "isBase64Encoded": True,
        "body": base64.b64encode(body).decode(),
    }
    if query:
        event["queryStringParameters"] = query
    if matched:
        event["pathParameters"] = matched[1]
    return event


class _Handler(BaseHTTPRequestHandler):
    agent: Any = None
    edge: EdgeHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # access log: debug only
        log.debug("http", extra={"line": format % args})

    def _send(self, response: dict[str, Any]) -> None:
        raw = response.get("raw")
        data = raw if raw is not None else str(response.get("body", "")).encode()
        self.send_response(int(response["statusCode"]))
        for key, value in (response.get("headers") or {}).items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, status: int, text: str, content_type: str) -> None:
        self._send({"statusCode": status, "headers": {"content-type": content_type}, "raw": text.encode()})

    def _guard(self, call: Any) -> None:
        try:
            self._send(call())
        except RequestError as exc:
            self._send(error_response(exc.status, exc.code, exc.message))
        except IdempotencyConflict:
            self._send(error_response(409, "idempotency_conflict", "idempotency key was already used for a "
                                      "different image, camera or threshold; send a new key"))  # fmt: skip
        except Exception as exc:
            log.exception("http request failed")
            self._send(error_response(500, "internal_error", f"{type(exc).__name__}"))

    def do_GET(self) -> None:
        split = urlsplit(self.path)
        if split.path == "/metrics":
            self._text(200, self.agent.metrics.render(), "text/plain; version=0.0.4")
        elif split.path == "/status":
            self._text(200, json.dumps(self.agent.status(), default=str), "application/json")
        elif split.path == "/healthz":
            ok = self.agent.models._live is not None
            self._text(200 if ok else 503, "ok" if ok else "no model", "text/plain")
        else:
            query = dict(parse_qsl(split.query, keep_blank_values=True))
            self._guard(lambda: self.edge.get(split.path, query))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._send(error_response(413, "payload_too_large", "request exceeds 10 MB"))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        if match_route("POST", split.path) is None or match_route("POST", split.path)[0] != " ".join(
            SCORE_ROUTE
        ):
            self._send({"statusCode": 404, "headers": {"content-type": "application/json"},
                        "body": json.dumps({"message": "Not Found"})})  # fmt: skip
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        event = build_event("POST", self.path, headers, body)
        self._guard(lambda: self.edge.score(event))
