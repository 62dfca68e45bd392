"""The request flow behind the Lambda handler.

``POST /cameras/{camera_id}/images``: parse → lookup (replay / 409) → score → analyse (mask,
area, regions, confidence) → overlay → persist → respond. ``GET /cameras/{camera_id}/results/
{request_id}`` and ``GET /cameras/{camera_id}/results?since=&until=&limit=&next_token=`` read
what was stored. Kept apart from ``serving.app`` (which builds one service at import, as Lambda
wants) so tests, local servers and tools can build a service from explicit parts.
Configuration (all env, parsed in :meth:`serving.events.RequestLimits.from_env` and
:meth:`serving.storage.ResultStore.from_env`): ``MODEL_DIR`` (default: ``model/`` next to this
file), ``ORT_INTRA_OP_THREADS``, ``POWERTOOLS_SERVICE_NAME``, ``POWERTOOLS_METRICS_NAMESPACE``.

Observability (AWS Lambda Powertools): one structured log line per request with the Lambda
context (added by ``serving.app``) and the request id as correlation id; CloudWatch metrics in
EMF on stdout — latency per phase, anomalies and requests per camera, errors by code. Routing
is by hand (a dict of three routes): Powertools' resolvers are bound to one event shape, and
this handler accepts REST v1, HTTP API v2 and function-URL events alike.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from core.answer import analyse, confidence, mask_png
from core.preprocess import PreprocessError
from core.scoring import Scorer, ScoringError, overlay
from serving.events import (
    IDENTIFIER_RE,
    REQUEST_ID_RE,
    RequestError,
    RequestLimits,
    normalise_timestamp,
    parse_answer_options,
    parse_event,
    query_parameters,
    validate_identifier,
)
from serving.routes import RESULT_ROUTE, RESULTS_ROUTE, event_method_and_path, match_route
from serving.storage import IdempotencyConflict, InvalidPageToken, ResultRecord, ResultStore, StorageError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"  # what `promote` writes
SERVICE_NAME = os.environ.get("POWERTOOLS_SERVICE_NAME", "visual-inspection")
METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "VisualInspection")
logger = Logger(service=SERVICE_NAME)
RETRY_AFTER_S = "1"

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


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A proxy-integration response understood by API Gateway v1, v2 and function URLs."""
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body, separators=(",", ":")),
        "isBase64Encoded": False,
    }


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``{"error": {"code", "message"}}`` (+ ``request_id`` when known, to correlate with logs)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return json_response(status, {"error": error}, headers)


class InferenceService:
    """One scorer + one result store + input limits; :meth:`handle` serves one event."""

    def __init__(self, scorer: Scorer, store: ResultStore, limits: RequestLimits | None = None) -> None:
        self.scorer = scorer
        self.store = store
        self.limits = limits or RequestLimits()

    @classmethod
    def from_env(cls) -> InferenceService:
        """Load the model from ``MODEL_DIR`` and configure storage and limits from the environment."""
        model_dir = Path(os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR)
        return cls(Scorer.from_dir(model_dir), ResultStore.from_env(), RequestLimits.from_env())

    # -- entry ----------------------------------------------------------------------------------
    def handle(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        """Serve one event; never raises (every failure becomes a JSON error response)."""
        started = time.perf_counter()
        latency: dict[str, float] = {}
        log: dict[str, Any] = {"aws_request_id": getattr(context, "aws_request_id", None)}
        state: dict[str, Any] = {"request_id": None, "camera_id": None}
        try:
            method, path = event_method_and_path(event) if isinstance(event, dict) else ("POST", "")
            if method == "GET":
                return self._handle_get(event, path, latency, started, log, state)
            return self._handle_score(event, latency, started, log, state)
        except RequestError as exc:
            return self._fail(exc.status, exc.code, exc.message, state, latency, started, log)
        except IdempotencyConflict:
            message = (
                f"idempotency key {state['request_id']!r} was already used for a different image, "
                "camera or threshold; send a new key"
            )
            return self._fail(409, "idempotency_conflict", message, state, latency, started, log)
        except StorageError as exc:
            log["storage_error"] = str(exc)  # endpoint, bucket and key details: logs only
            if exc.retryable:
                return self._fail(
                    503, f"{exc.store}_error", exc.public_message, state, latency, started, log, retry=True
                )
            return self._fail(500, f"{exc.store}_error", exc.public_message, state, latency, started, log)
        except PreprocessError as exc:  # decoded fine, but no rule turns its pixels into model input
            return self._fail(422, "unsupported_image", str(exc), state, latency, started, log)
        except ScoringError as exc:
            log["scoring_error"] = str(exc)
            message = "the model failed on this image"
            return self._fail(500, "scoring_error", message, state, latency, started, log)
        except Exception:  # last resort: log the traceback, do not leak internals to the client
            logger.exception("unhandled error", extra=log)
            return self._fail(500, "internal_error", "internal error", state, latency, started, log)

    # -- POST /cameras/{camera_id}/images ------------------------------------------------------
    def _handle_score(
        self,
        event: dict[str, Any],
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
        state: dict[str, Any],
    ) -> dict[str, Any]:
        request = parse_event(event, self.limits, fallback_request_id=log["aws_request_id"])
        latency["parse"] = _ms_since(started)
        state.update(request_id=request.request_id, camera_id=request.camera_id)
        logger.set_correlation_id(request.request_id)
        log.update(
            request_id=request.request_id,
            camera_id=request.camera_id,
            event_source=request.event_source,
            image_bytes=len(request.image_bytes),
            image_size=list(request.original_size),
            working_size=list(request.image.size),
        )

        t = time.perf_counter()
        existing = self.store.get(request.camera_id, request.request_id)
        latency["lookup"] = _ms_since(t)
        if existing is not None:
            stored = existing.get("fingerprint")
            if stored and stored != request.fingerprint:
                raise IdempotencyConflict(existing)
            body = self._answer(existing, request.mask, request.regions, mask_bytes=None)
            return self._respond(body, replayed=True, latency=latency, started=started, log=log)

        t = time.perf_counter()
        result = self.scorer.score(request.image)
        latency["score"] = _ms_since(t)
        latency.update({f"score_{k}": v for k, v in result.timings.items()})

        t = time.perf_counter()
        threshold = request.threshold if request.threshold is not None else self.scorer.threshold
        # The model-size map placed back on the working image through the resize policy (letterbox
        # padding dropped), once: mask, regions and overlay all read these pixels.
        heat = self.scorer.map_to_image(result.anomaly_map, request.image)
        analysis = analyse(heat, threshold, request.image.size, request.original_size)
        mask_bytes = mask_png(analysis.mask)
        latency["analyse"] = _ms_since(t)

        t = time.perf_counter()
        overlay_png = overlay(request.image, heat)
        latency["overlay"] = _ms_since(t)

        meta = self.scorer.metadata
        record = ResultRecord(
            camera_id=request.camera_id,
            request_id=request.request_id,
            captured_at=request.captured_at,
            score=result.score,
            is_anomalous=result.score >= threshold,
            threshold=threshold,
            model_name=meta.model_name,
            model_version=meta.registry_version,
            latency_ms={k: latency[k] for k in ("parse", "score", "analyse", "overlay")},
            image_width=request.original_size[0],
            image_height=request.original_size[1],
            fingerprint=request.fingerprint,
            image_sha256=request.image_sha256,
            extra={
                "confidence": confidence(result.score, threshold),
                "threshold_source": "request" if request.threshold is not None else "model",
                "sensitivity": request.sensitivity,
                "anomalous_area_pct": analysis.anomalous_area_pct,
                "regions": analysis.regions,
                "mask_width": request.image.width,
                "mask_height": request.image.height,
            },
        )
        t = time.perf_counter()
        outcome = self.store.save(
            record,
            overlay_png,
            mask_png=mask_bytes,
            original=request.image_bytes,
            original_content_type=request.content_type,
        )
        latency["persist"] = _ms_since(t)
        own_mask = None if outcome.replayed else mask_bytes
        body = self._answer(outcome.item, request.mask, request.regions, mask_bytes=own_mask)
        return self._respond(body, replayed=outcome.replayed, latency=latency, started=started, log=log)

    # -- GET routes ----------------------------------------------------------------------------
    def _handle_get(
        self,
        event: dict[str, Any],
        path: str,
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
        state: dict[str, Any],
    ) -> dict[str, Any]:
        # API Gateway names the route (v2 routeKey, v1 resource); function URLs only give the path.
        declared = event.get("routeKey") if event.get("routeKey") != "$default" else None
        if not declared and event.get("resource"):
            declared = f"GET {event['resource']}"
        matched = match_route("GET", path)
        params = {**(matched[1] if matched else {}), **(event.get("pathParameters") or {})}
        route = declared or (matched[0] if matched else "")
        camera_id = validate_identifier(params.get("camera_id"), "camera_id", IDENTIFIER_RE)
        state["camera_id"] = camera_id
        query = query_parameters(event)
        presentation = {k: v for k, v in query.items() if k in ("mask", "regions")}
        _, _, mask, regions = parse_answer_options({}, presentation)
        if route == " ".join(RESULT_ROUTE):
            raw_id = params.get("request_id")
            request_id = validate_identifier(raw_id, "request_id", REQUEST_ID_RE, ", '=', '+'")
            state["request_id"] = request_id
            logger.set_correlation_id(request_id)
            item = self.store.get(camera_id, request_id)
            latency["lookup"] = _ms_since(started)
            if item is None:
                raise RequestError(404, "result_not_found", f"no stored result for {camera_id}/{request_id}")
            body = self._answer(item, mask, regions, mask_bytes=None)
            return self._respond(body, replayed=True, latency=latency, started=started, log=log, kind="get")
        if route != " ".join(RESULTS_ROUTE):
            raise RequestError(404, "not_found", f"no route for GET {path}")
        if mask == "base64":
            raise RequestError(400, "invalid_mask", "lists return masks as URLs only: use mask=url")
        since = normalise_timestamp(query["since"], "since") if "since" in query else None
        until = normalise_timestamp(query["until"], "until") if "until" in query else None
        limit = _page_limit(query.get("limit"), self.limits.max_results_page)
        try:
            items, next_token = self.store.query(
                camera_id, since=since, until=until, limit=limit, next_token=query.get("next_token") or None
            )
        except InvalidPageToken as exc:
            raise RequestError(400, "invalid_next_token", str(exc)) from exc
        latency["query"] = _ms_since(started)
        results = [self._answer(item, mask, regions, mask_bytes=None) for item in items]
        body = {"camera_id": camera_id, "results": results, "next_token": next_token}
        return self._respond(body, replayed=True, latency=latency, started=started, log=log, kind="list")

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

    def _respond(
        self,
        body: dict[str, Any],
        *,
        replayed: bool,
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
        kind: str = "score",
    ) -> dict[str, Any]:
        latency["total"] = _ms_since(started)
        summary = {k: body.get(k) for k in ("score", "is_anomalous", "result_uri")} if kind != "list" else {}
        logger.info(
            "scored" if kind == "score" else "read",
            extra={**log, "status": 200, "replayed": replayed, **summary, "latency_ms": _rounded(latency)},
        )
        camera, anomalous = body.get("camera_id"), body.get("is_anomalous")
        self._emit_metrics(kind, 200, None, camera, anomalous, replayed, latency)
        headers = {"x-idempotent-replay": "true" if replayed else "false"} if kind == "score" else {}
        return json_response(200, body, headers)

    def _fail(
        self,
        status: int,
        code: str,
        message: str,
        state: dict[str, Any],
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
        *,
        retry: bool = False,
    ) -> dict[str, Any]:
        latency["total"] = _ms_since(started)
        log_fn = logger.warning if status < 500 else logger.error
        extra = {**log, "status": status, "code": code, "error": message, "latency_ms": _rounded(latency)}
        log_fn("request failed", extra=extra)
        self._emit_metrics("error", status, code, state.get("camera_id"), None, False, latency)
        headers = {"retry-after": RETRY_AFTER_S} if retry else None
        return error_response(status, code, message, state.get("request_id"), headers)

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
                if not phase.startswith("score_"):
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


def _page_limit(raw: str | None, maximum: int) -> int:
    if raw is None or raw == "":
        return min(50, maximum)
    if not raw.isdigit() or not (1 <= int(raw) <= maximum):
        raise RequestError(400, "invalid_limit", f"limit must be an integer from 1 to {maximum}")
    return int(raw)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _rounded(latency: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in latency.items()}
