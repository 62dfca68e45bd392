"""The request flow behind the Lambda handler, routed by Powertools' REST resolver.

``POST /cameras/{camera_id}/images``: authorize → parse → lookup (replay / 409) → score → analyse
(mask, area, regions, confidence) → overlay → persist → respond; score to overlay is
:func:`core.inspection.inspect_image`, the chain the edge agent runs too. ``GET /cameras/{camera_id}/results/
{request_id}`` and ``GET /cameras/{camera_id}/results?since=&until=&limit=&next_token=`` read what
was stored. Routes come from :data:`serving.routes.ROUTES` (the table infra/ also reads); a path no
route serves is 404 and a known path with another method 405, neither scored. Failures are mapped
to JSON errors by one ``exception_handler`` per failure type. Kept apart from ``serving.app`` (which
builds one service at import, as Lambda wants) so tests, local servers and tools can build a service
from explicit parts. Configuration (all env, parsed in :meth:`serving.events.RequestLimits.from_env`
and :meth:`serving.storage.ResultStore.from_env`): ``MODEL_DIR`` (default: ``model/`` next to this
file), ``ORT_INTRA_OP_THREADS``, ``POWERTOOLS_SERVICE_NAME``, ``POWERTOOLS_METRICS_NAMESPACE``.

Who may call: a camera principal (:mod:`serving.identity`) posts only for its own camera id and
reads nothing (403, nothing stored); IAM decides for every other principal.

Observability (AWS Lambda Powertools): one structured log line per request with the Lambda context
(added by ``serving.app``), the caller (ARN, access key, source IP) and the request id as correlation
id; CloudWatch metrics in EMF on stdout: latency per phase (``parse`` with ``decode``; ``score`` with
``preprocess``, ``inference``, ``postprocess``; ``analyse``; ``overlay`` = overlay and mask PNG
encoding; ``lookup``; each ``s3_put_<kind>`` and ``dynamodb_put`` within ``persist``; ``total``),
anomalies and requests per camera, errors by code.

Time: storage calls run against the Lambda's remaining time (``context.get_remaining_time_in_millis``)
less :data:`RESPONSE_RESERVE_S`; a call that might not finish by then is not started and the
request is answered 503 (retry with the same key) while there is still time to answer.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from core.inspection import inspect_image
from core.preprocess import PreprocessError
from core.scoring import Scorer, ScoringError
from serving.events import (
    RequestError,
    RequestLimits,
    ScoringRequest,
    is_rest_event,
    parse_event,
    parse_list_query,
    parse_result_query,
)
from serving.identity import Caller, caller_from_event
from serving.observability import METRICS_NAMESPACE, SERVICE_NAME, service_logger
from serving.routes import (
    BASE_PATH_PREFIX,
    RESULT_ROUTE,
    RESULTS_ROUTE,
    SCORE_ROUTE,
    allowed_methods,
    resolver_rule,
    strip_base_path,
)
from serving.storage import IdempotencyConflict, InvalidPageToken, ResultRecord, ResultStore, StorageError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"  # what `promote` writes
logger = service_logger()
RETRY_AFTER_S = "1"
JSON = "application/json"
# Kept free at the end of the Lambda's time to log, emit metrics and return the answer.
RESPONSE_RESERVE_S = 0.5
# Powertools keeps the event being resolved on its router class (one per process, as Lambda runs
# one event at a time per environment). A process that serves events from several threads (the
# local server, tests) must resolve one at a time, or a route would read another request's event.
_RESOLVE_LOCK = threading.Lock()

RESPONSE_FIELDS = (
    "score",
    "is_anomalous",
    "confidence",
    "threshold",
    "threshold_source",
    "sensitivity",
    "anomalous_area_pct",
    "model_name",
    "model_version",
    "result_uri",
    "request_id",
    "camera_id",
    "captured_at",
    "image_width",
    "image_height",
)


def error_body(code: str, message: str, request_id: str | None = None) -> str:
    """``{"error": {"code", "message"}}`` (+ ``request_id`` when known, to correlate with logs)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return _dumps({"error": error})


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A JSON answer as the handler sends it (also built by the edge agent's HTTP API)."""
    return Response(status, JSON, _dumps(body), headers=headers or {})


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error answer as the handler sends it: :func:`error_body` with ``status`` and ``headers``."""
    return Response(status, JSON, error_body(code, message, request_id), headers=headers or {})


@dataclass
class Trace:
    """One request's log fields, latency per phase and the ids known so far (for error bodies)."""

    caller: Caller
    aws_request_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    latency: dict[str, float] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    camera_id: str | None = None

    def __post_init__(self) -> None:
        self.log.update(aws_request_id=self.aws_request_id, **self.caller.log_fields())

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase into ``latency[name]`` (ms), also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.latency[name] = (time.perf_counter() - started) * 1000.0

    def identify(self, camera_id: str | None, request_id: str | None = None) -> None:
        """Record the ids once known: in every later log line, error body and as correlation id."""
        if camera_id:
            self.camera_id = camera_id
            self.log["camera_id"] = camera_id
        if request_id:
            self.request_id = request_id
            self.log["request_id"] = request_id
            logger.set_correlation_id(request_id)


class InferenceService:
    """Scorer + result store + input limits behind a REST resolver; :meth:`handle` serves one event."""

    def __init__(self, scorer: Scorer, store: ResultStore, limits: RequestLimits | None = None) -> None:
        self.scorer = scorer
        self.store = store
        self.limits = limits or RequestLimits()
        self.app = self._resolver()

    @classmethod
    def from_env(cls) -> InferenceService:
        """Load the model from ``MODEL_DIR`` and configure storage and limits from the environment."""
        model_dir = Path(os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR)
        return cls(Scorer.from_dir(model_dir), ResultStore.from_env(), RequestLimits.from_env())

    def _resolver(self) -> APIGatewayRestResolver:
        """Routes from the route table, one exception handler per failure type, 404/405 for the rest."""
        app = APIGatewayRestResolver(strip_prefixes=[BASE_PATH_PREFIX])
        app.route(resolver_rule(SCORE_ROUTE[1]), SCORE_ROUTE[0])(self._post_image)
        app.route(resolver_rule(RESULT_ROUTE[1]), RESULT_ROUTE[0])(self._get_result)
        app.route(resolver_rule(RESULTS_ROUTE[1]), RESULTS_ROUTE[0])(self._list_results)
        app.not_found(self._no_route)
        app.exception_handler(RequestError)(self._client_error)
        app.exception_handler(IdempotencyConflict)(self._idempotency_conflict)
        app.exception_handler(StorageError)(self._storage_error)
        app.exception_handler(PreprocessError)(self._unsupported_image)
        app.exception_handler(ScoringError)(self._scoring_error)
        app.exception_handler(Exception)(self._unexpected)
        return app

    # -- entry ----------------------------------------------------------------------------------
    def handle(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        """Serve one API Gateway REST proxy event; never raises (failures become JSON errors)."""
        caller = caller_from_event(event) if isinstance(event, dict) else Caller(arn="anonymous")
        trace = Trace(caller, aws_request_id=getattr(context, "aws_request_id", None))
        with _RESOLVE_LOCK, self.store.deadline(storage_deadline(context)):
            if not is_rest_event(event):  # nothing to route on: answered here, as the resolver cannot
                logger.set_correlation_id(None)
                response = self._fail(trace, 400, "unsupported_event", "not an API Gateway REST proxy event")
                return {
                    "statusCode": response.status_code,
                    "multiValueHeaders": {"Content-Type": [JSON]},
                    "body": response.body,
                    "isBase64Encoded": False,
                }
            logger.set_correlation_id((event.get("requestContext") or {}).get("requestId"))
            self.app.append_context(trace=trace)
            return self.app.resolve(event, context)

    @property
    def _trace(self) -> Trace:
        return self.app.context["trace"]

    def _path_parameters(self, route_args: dict[str, str]) -> dict[str, str]:
        """API Gateway's decoded ``pathParameters``, else the resolver's match decoded the same way."""
        return self.app.current_event.path_parameters or {k: unquote(v) for k, v in route_args.items()}

    # -- routes ---------------------------------------------------------------------------------
    def _post_image(self, **route_args: str) -> Response:
        trace, event = self._trace, self.app.current_event
        params = self._path_parameters(route_args)
        self._authorize_write(trace.caller, params.get("camera_id"))  # before any decoding
        with trace.phase("parse"):
            request = parse_event(
                event, self.limits, path_parameters=params, fallback_request_id=trace.aws_request_id
            )
        trace.latency["decode"] = request.decode_ms
        trace.identify(request.camera_id, request.request_id)
        self._authorize_write(trace.caller, request.camera_id)  # the camera of the header or body
        trace.log.update(
            image_bytes=len(request.image_bytes),
            image_size=list(request.original_size),
            working_size=list(request.image.size),
        )
        body, replayed = self.score_and_store(request, trace)
        return self._respond(trace, body, replayed=replayed, kind="score")

    def _get_result(self, **route_args: str) -> Response:
        trace = self._trace
        self._authorize_read(trace.caller)
        query = parse_result_query(self.app.current_event, self._path_parameters(route_args))
        trace.identify(query.camera_id, query.request_id)
        with trace.phase("lookup"):
            item = self.store.get(query.camera_id, query.request_id)
        if item is None:
            raise RequestError(
                404, "result_not_found", f"no stored result for {query.camera_id}/{query.request_id}"
            )
        body = self._answer(item, query.mask, query.regions, mask_bytes=None)
        return self._respond(trace, body, replayed=True, kind="get")

    def _list_results(self, **route_args: str) -> Response:
        trace = self._trace
        self._authorize_read(trace.caller)
        query = parse_list_query(self.app.current_event, self.limits, self._path_parameters(route_args))
        trace.identify(query.camera_id)
        try:
            with trace.phase("query"):
                items, next_token = self.store.query(
                    query.camera_id,
                    since=query.since,
                    until=query.until,
                    limit=query.limit,
                    next_token=query.next_token,
                )
        except InvalidPageToken as exc:
            raise RequestError(400, "invalid_next_token", str(exc)) from exc
        results = [self._answer(item, query.mask, query.regions, mask_bytes=None) for item in items]
        body = {"camera_id": query.camera_id, "results": results, "next_token": next_token}
        return self._respond(trace, body, replayed=True, kind="list")

    @staticmethod
    def _authorize_write(caller: Caller, camera_id: str | None) -> None:
        if camera_id and not caller.may_write(camera_id):
            raise RequestError(
                403,
                "forbidden",
                f"these credentials belong to camera {caller.camera_id!r} and may post images only for it",
            )

    @staticmethod
    def _authorize_read(caller: Caller) -> None:
        if not caller.may_read():
            raise RequestError(403, "forbidden", "camera credentials may post images but not read results")

    # -- POST flow after parsing -------------------------------------------------------------------
    def score_and_store(self, request: ScoringRequest, trace: Trace) -> tuple[dict[str, Any], bool]:
        """Lookup (replay / 409) → score → analyse → overlay → persist: ``(answer, replayed)``.

        Thread-safe and resolver-free: what two Lambda instances run at once for the same key.
        """
        latency = trace.latency
        with trace.phase("lookup"):  # a replay also sweeps what dead attempts left (storage rule 5)
            existing = self.store.lookup(request.camera_id, request.request_id, request.fingerprint)
        if existing is not None:
            return self._answer(existing, request.mask, request.regions, mask_bytes=None), True

        inspection = inspect_image(  # score (preprocess, inference, postprocess), analyse, overlay
            self.scorer,
            request.image,
            request.original_size,
            threshold=request.threshold,
            sensitivity=request.sensitivity,
            latency=latency,
        )
        meta = self.scorer.metadata
        record = ResultRecord.scored(
            request,
            inspection,
            model_name=meta.model_name,
            model_version=meta.registry_version,
            latency_ms={k: latency[k] for k in ("parse", "score", "analyse", "overlay") if k in latency},
        )
        with trace.phase("persist"):
            outcome = self.store.save(
                record,
                inspection.overlay_png,
                mask_png=inspection.mask_png,
                original=request.image_bytes,
                original_content_type=request.content_type,
                timings=latency,
            )
        own_mask = None if outcome.replayed else inspection.mask_png
        return self._answer(
            outcome.item, request.mask, request.regions, mask_bytes=own_mask
        ), outcome.replayed

    # -- failures (one handler per type) ---------------------------------------------------------
    def _no_route(self, _: NotFoundError) -> Response:
        method = self.app.current_event.http_method.upper()
        path = self.app.current_event.path
        allowed = allowed_methods(path)
        if allowed:
            message = f"{method} is not allowed on {strip_base_path(path)}; use {', '.join(allowed)}"
            return self._fail(
                self._trace, 405, "method_not_allowed", message, headers={"Allow": ", ".join(allowed)}
            )
        return self._fail(
            self._trace, 404, "not_found", f"no route for {method} {strip_base_path(path)[:200]}"
        )

    def _client_error(self, exc: RequestError) -> Response:
        return self._fail(self._trace, exc.status, exc.code, exc.message)

    def _idempotency_conflict(self, _: IdempotencyConflict) -> Response:
        message = (
            f"idempotency key {self._trace.request_id!r} was already used for a different image, "
            "camera or threshold; send a new key"
        )
        return self._fail(self._trace, 409, "idempotency_conflict", message)

    def _storage_error(self, exc: StorageError) -> Response:
        trace = self._trace
        trace.log["storage_error"] = str(exc)  # endpoint, bucket and key details: logs only
        if exc.retryable:
            return self._fail(trace, 503, f"{exc.store}_error", exc.public_message, retry=True)
        return self._fail(trace, 500, f"{exc.store}_error", exc.public_message)

    def _unsupported_image(self, exc: PreprocessError) -> Response:
        # Decoded fine, but no rule turns its pixels into model input.
        return self._fail(self._trace, 422, "unsupported_image", str(exc))

    def _scoring_error(self, exc: ScoringError) -> Response:
        self._trace.log["scoring_error"] = str(exc)
        return self._fail(self._trace, 500, "scoring_error", "the model failed on this image")

    def _unexpected(self, exc: Exception) -> Response:
        # Last resort: the traceback goes to the logs, nothing internal to the client.
        logger.exception("unhandled error", extra=self._trace.log)
        return self._fail(self._trace, 500, "internal_error", "internal error")

    # -- answer and response -------------------------------------------------------------------
    def _answer(
        self, item: dict[str, Any], mask: str | None, regions: bool, *, mask_bytes: bytes | None
    ) -> dict[str, Any]:
        """The client's view of a stored item, plus the mask / regions when asked for."""
        body = {key: item.get(key) for key in RESPONSE_FIELDS}
        if regions:
            body["regions"] = item.get("regions") or []
        if mask:
            key = item.get("mask_key")
            if not key:
                body["mask"] = None  # stored before masks were kept
            elif mask == "url":
                body["mask"] = {
                    "format": "png",
                    "url": self.store.presigned_url(key, self.limits.mask_url_expires_s),
                    "expires_in_s": self.limits.mask_url_expires_s,
                    "width": item.get("mask_width"),
                    "height": item.get("mask_height"),
                }
            else:
                data = mask_bytes if mask_bytes is not None else self.store.read_object(key)
                body["mask"] = {
                    "format": "png",
                    "base64": base64.b64encode(data).decode(),
                    "width": item.get("mask_width"),
                    "height": item.get("mask_height"),
                }
        return body

    def _respond(self, trace: Trace, body: dict[str, Any], *, replayed: bool, kind: str) -> Response:
        """200 with ``body``: one log line and the request's metrics."""
        trace.latency["total"] = (time.perf_counter() - trace.started) * 1000.0
        summary = {k: body.get(k) for k in ("score", "is_anomalous", "result_uri")} if kind != "list" else {}
        logger.info(
            "scored" if kind == "score" else "read",
            extra={
                **trace.log,
                "status": 200,
                "replayed": replayed,
                **summary,
                "latency_ms": _rounded(trace.latency),
            },
        )
        camera, anomalous = body.get("camera_id"), body.get("is_anomalous")
        self._emit_metrics(kind, 200, None, camera, anomalous, replayed, trace.latency)
        headers = {"x-idempotent-replay": "true" if replayed else "false"} if kind == "score" else {}
        return json_response(200, body, headers)

    def _fail(
        self,
        trace: Trace,
        status: int,
        code: str,
        message: str,
        *,
        retry: bool = False,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """An error response: one log line (warning for 4xx, error for 5xx) and the error metric."""
        trace.latency["total"] = (time.perf_counter() - trace.started) * 1000.0
        log_fn = logger.warning if status < 500 else logger.error
        extra = {
            **trace.log,
            "status": status,
            "code": code,
            "error": message,
            "latency_ms": _rounded(trace.latency),
        }
        log_fn("request failed", extra=extra)
        self._emit_metrics("error", status, code, trace.camera_id, None, False, trace.latency)
        headers = {**(headers or {}), **({"Retry-After": RETRY_AFTER_S} if retry else {})}
        return error_response(status, code, message, trace.request_id, headers)

    @staticmethod
    def _emit_metrics(
        kind: str,
        status: int,
        code: str | None,
        camera_id: str | None,
        is_anomalous: bool | None,
        replayed: bool,
        latency: dict[str, float],
    ) -> None:
        """EMF lines: latency per phase; requests/anomalies per camera; errors by code.

        ``EphemeralMetrics`` keeps no state between instances, so concurrent requests in one
        process (local server threads) cannot mix their metrics.
        """
        try:
            phases = EphemeralMetrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
            for phase, ms in latency.items():
                phases.add_metric(name=f"latency_{phase}", unit=MetricUnit.Milliseconds, value=ms)
            phases.add_metric(name="requests", unit=MetricUnit.Count, value=1)
            phases.flush_metrics()
            if code is not None:
                errors = EphemeralMetrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
                errors.add_dimension(name="error_code", value=code)
                errors.add_metric(name="errors", unit=MetricUnit.Count, value=1)
                errors.add_metadata(key="status", value=status)
                errors.flush_metrics()
            elif kind == "score" and camera_id and not replayed:
                per_camera = EphemeralMetrics(namespace=METRICS_NAMESPACE, service=SERVICE_NAME)
                per_camera.add_dimension(name="camera_id", value=camera_id)
                per_camera.add_metric(name="scored", unit=MetricUnit.Count, value=1)
                per_camera.add_metric(name="anomalies", unit=MetricUnit.Count, value=1 if is_anomalous else 0)
                per_camera.flush_metrics()
        except Exception:  # metrics must never fail a request
            logger.exception("could not emit metrics")


def storage_deadline(context: Any) -> float | None:
    """When storage calls must be done (``time.monotonic()``): the Lambda's end less the reserve."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return time.monotonic() + remaining() / 1000.0 - RESPONSE_RESERVE_S


def _rounded(latency: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in latency.items()}
