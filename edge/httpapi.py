"""The agent's HTTP API: the cloud's routes and answers, plus /status, /metrics and /healthz.

Why the same routes: a camera (or the vi-client) can point at the cloud or at the agent without
changing anything. Each request is turned into the API Gateway REST (v1) event the Lambda would
get (:func:`serving.rest_event.build_event`, the local server's builder) and parsed by the Lambda's
own parsers (:func:`serving.events.parse_event`, ``parse_result_query``, ``parse_list_query``) - the
same validation, error codes and idempotency keys (``Idempotency-Key`` / ``X-Request-Id``). The
answer is built from the same :data:`serving.service.RESPONSE_FIELDS`, and answers and errors by the
handler's :func:`serving.service.json_response` / :func:`serving.service.error_response`; a path no
route serves is the handler's 404 (405 for another method). A replay (same key, same image) returns
the stored answer; the same key with another image is 409.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from aws_lambda_powertools.event_handler import Response

from edge.config import HttpConfig
from edge.jobs import Job
from edge.outbox import Entry, OutboxFull
from serving.events import RequestError, parse_event, parse_list_query, parse_result_query
from serving.rest_event import build_event
from serving.routes import RESULT_ROUTE, RESULTS_ROUTE, SCORE_ROUTE, allowed_methods, match_route
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

    def score(self, event: dict[str, Any]) -> Response:
        """POST /cameras/{camera_id}/images (a REST v1 event) through the agent's queue."""

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

        retry = {"Retry-After": str(self.config.retry_after_s)}
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

    def get(self, event: dict[str, Any], *, mask_route: bool = False) -> Response:
        """GET one result, a page of results (REST v1 events, the Lambda's parsers), or a stored mask."""
        resource = event.get("resource")
        if resource == RESULT_ROUTE[1]:
            query = parse_result_query(event)
            entry = self.agent.outbox.get(query.camera_id, query.request_id)
            if entry is None:
                raise RequestError(
                    404, "result_not_found", f"no stored result for {query.camera_id}/{query.request_id}"
                )
            if mask_route:
                data = self.agent.outbox.read_mask(entry)
                if data is None:
                    raise RequestError(404, "mask_not_found", "the mask was evicted after sync")
                return Response(200, "image/png", data)
            return json_response(200, self.answer(entry, query.mask, query.regions, None))
        if resource != RESULTS_ROUTE[1] or mask_route:
            return no_route("GET", event["path"] + ("/mask.png" if mask_route else ""))
        listing = parse_list_query(event, self.agent.limits)
        try:
            entries, token = self.agent.outbox.query(
                listing.camera_id,
                since=listing.since,
                until=listing.until,
                limit=listing.limit,
                next_token=listing.next_token,
            )
        except ValueError as exc:
            raise RequestError(400, "invalid_next_token", str(exc)) from exc
        results = [self.answer(e, listing.mask, listing.regions, None) for e in entries]
        return json_response(200, {"camera_id": listing.camera_id, "results": results, "next_token": token})


def no_route(method: str, path: str) -> Response:
    """The Lambda's answer for a path no route serves (404) or a method it does not take (405)."""
    allowed = allowed_methods(path)
    if allowed:
        message = f"{method} is not allowed on {path}; use {', '.join(allowed)}"
        return error_response(405, "method_not_allowed", message, headers={"Allow": ", ".join(allowed)})
    return error_response(404, "not_found", f"no route for {method} {path[:200]}")


class _Handler(BaseHTTPRequestHandler):
    agent: Any = None
    edge: EdgeHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # access log: debug only
        log.debug("http", extra={"line": format % args})

    def _send(self, response: Response) -> None:
        body = response.body
        data = body if isinstance(body, bytes) else str(body or "").encode()
        self.send_response(response.status_code)
        for key, values in response.headers.items():
            for value in values if isinstance(values, list) else [values]:
                self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, status: int, text: str, content_type: str) -> None:
        self._send(Response(status, content_type, text))

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

    def _event(self, method: str, path: str, query: str, body: bytes) -> dict[str, Any] | None:
        """The REST v1 event API Gateway would send for this request, or ``None`` if no route serves it."""
        route = match_route(method, path)
        if route is None:
            return None
        host, port = self.server.server_address[:2]
        return build_event(
            method=method,
            target=f"{path}?{query}" if query else path,
            headers=list(self.headers.items()),
            body=body,
            resource=route[0],
            path_parameters=route[1],
            source_ip=self.client_address[0],
            host=self.headers.get("host") or f"{host}:{port}",
        )

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
            mask_route = split.path.endswith("/mask.png")
            path = split.path[: -len("/mask.png")] if mask_route else split.path
            event = self._event("GET", path, split.query, b"")
            if event is None:
                self._send(no_route("GET", split.path))
                return
            self._guard(lambda: self.edge.get(event, mask_route=mask_route))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._send(error_response(413, "payload_too_large", "request exceeds 10 MB"))
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        event = self._event("POST", split.path, split.query, body)
        if event is None or event["resource"] != SCORE_ROUTE[1]:
            self._send(no_route("POST", split.path))
            return
        self._guard(lambda: self.edge.score(event))
