"""The request flow behind the Lambda handler: parse → (replay?) → score → overlay → persist → respond.

Kept apart from ``serving.app`` (which builds one service at import, as Lambda wants) so tests,
local servers and tools can build a service from explicit parts. Configuration (all env):
``MODEL_DIR`` (default: ``model/`` next to this file), ``RESULTS_TABLE``, ``RESULTS_BUCKET``,
``RESULTS_PREFIX``, ``STORE_ORIGINAL``, ``REQUIRE_CAMERA_ID``, ``MAX_BODY_BYTES``,
``MAX_IMAGE_PIXELS``, ``ORT_INTRA_OP_THREADS``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger

from serving.events import RequestError, RequestLimits, ScoringRequest, parse_event
from serving.preprocess import PreprocessError
from serving.scoring import Scorer, ScoringError, overlay
from serving.storage import ResultRecord, ResultStore, StorageError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"  # what `promote` writes
logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "visual-inspection"))

RESPONSE_FIELDS = (
    "score",
    "is_anomalous",
    "threshold",
    "model_name",
    "model_version",
    "result_uri",
    "request_id",
    "camera_id",
    "captured_at",
)


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A proxy-integration response understood by API Gateway v1, v2 and function URLs."""
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json", **(headers or {})},
        "body": json.dumps(body, separators=(",", ":")),
        "isBase64Encoded": False,
    }


def error_response(status: int, code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message"}}`` (+ ``request_id`` when known, to correlate with logs)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if request_id:
        error["request_id"] = request_id
    return json_response(status, {"error": error})


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

    def handle(self, event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        """Serve one event; never raises (every failure becomes a JSON error response)."""
        started = time.perf_counter()
        latency: dict[str, float] = {}
        request: ScoringRequest | None = None
        log: dict[str, Any] = {"aws_request_id": getattr(context, "aws_request_id", None)}
        try:
            request = parse_event(event, self.limits, fallback_request_id=log["aws_request_id"])
            latency["parse"] = _ms_since(started)
            log.update(
                request_id=request.request_id,
                camera_id=request.camera_id,
                event_source=request.event_source,
                image_bytes=len(request.image_bytes),
                image_size=list(request.image.size),
            )

            t = time.perf_counter()
            existing = self.store.get(request.camera_id, request.request_id)
            latency["lookup"] = _ms_since(t)
            if existing is not None:
                return self._respond(existing, replayed=True, latency=latency, started=started, log=log)

            t = time.perf_counter()
            result = self.scorer.score(request.image)
            latency["score"] = _ms_since(t)
            latency.update({f"score_{k}": v for k, v in result.timings.items()})

            t = time.perf_counter()
            overlay_png = overlay(request.image, result.anomaly_map, geometry=result.geometry)
            latency["overlay"] = _ms_since(t)

            meta = self.scorer.metadata
            record = ResultRecord(
                camera_id=request.camera_id,
                request_id=request.request_id,
                captured_at=request.captured_at,
                score=result.score,
                is_anomalous=result.is_anomalous,
                threshold=result.threshold,
                model_name=meta.model_name,
                model_version=meta.registry_version,
                latency_ms={k: latency[k] for k in ("parse", "score", "overlay")},
                image_width=request.image.width,
                image_height=request.image.height,
            )
            t = time.perf_counter()
            outcome = self.store.save(
                record,
                overlay_png,
                original=request.image_bytes,
                original_content_type=request.content_type,
            )
            latency["persist"] = _ms_since(t)
            return self._respond(
                outcome.item, replayed=outcome.replayed, latency=latency, started=started, log=log
            )
        except RequestError as exc:
            return self._fail(exc.status, exc.code, exc.message, request, latency, started, log)
        except StorageError as exc:
            status = 503 if exc.retryable else 500
            return self._fail(status, f"{exc.store}_error", str(exc), request, latency, started, log)
        except PreprocessError as exc:  # decoded fine, but no rule turns its pixels into model input
            return self._fail(422, "unsupported_image", str(exc), request, latency, started, log)
        except ScoringError as exc:
            return self._fail(500, "scoring_error", str(exc), request, latency, started, log)
        except Exception:  # last resort: log the traceback, do not leak internals to the client
            logger.exception("unhandled error", extra=log)
            return self._fail(500, "internal_error", "internal error", request, latency, started, log)

    def _respond(
        self,
        item: dict[str, Any],
        *,
        replayed: bool,
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
    ) -> dict[str, Any]:
        latency["total"] = _ms_since(started)
        body = {key: item.get(key) for key in RESPONSE_FIELDS}
        logger.info(
            "scored",
            extra={
                **log,
                "status": 200,
                "replayed": replayed,
                "score": body["score"],
                "is_anomalous": body["is_anomalous"],
                "result_uri": body["result_uri"],
                "latency_ms": _rounded(latency),
            },
        )
        return json_response(200, body, {"x-idempotent-replay": "true" if replayed else "false"})

    @staticmethod
    def _fail(
        status: int,
        code: str,
        message: str,
        request: ScoringRequest | None,
        latency: dict[str, float],
        started: float,
        log: dict[str, Any],
    ) -> dict[str, Any]:
        latency["total"] = _ms_since(started)
        log_fn = logger.warning if status < 500 else logger.error
        extra = {**log, "status": status, "code": code, "error": message, "latency_ms": _rounded(latency)}
        log_fn("request failed", extra=extra)
        return error_response(status, code, message, request.request_id if request else None)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _rounded(latency: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in latency.items()}
