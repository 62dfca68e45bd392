"""Persist scoring results: overlay, mask (and optionally the original) to S3, the record to DynamoDB.

Consistency rules (each exercised by ``tests/serving/test_faults.py`` through a fault proxy):

1. A retried request (same ``camera_id`` + ``request_id``) is looked up with
   :meth:`ResultStore.lookup` before scoring. The stored item carries the request's ``fingerprint``
   (camera + image sha256 + answer-changing options): same fingerprint → the stored answer is
   replayed (and the request's prefix swept, rule 5); another one → :class:`IdempotencyConflict`
   (409) and nothing is stored.
2. Every attempt writes its S3 objects under its own key
   ``{prefix}{camera}/{YYYY/MM/DD}/{request_id}/{attempt_id}-overlay.png`` (``-mask.png``,
   ``-original.<ext>``): no request or retry can overwrite another's object.
3. Objects first, then the DynamoDB item with a conditional put (no item yet, or only a
   tombstone that does not name this attempt): an item never points at a missing object and a
   concurrent duplicate cannot store a second record.
4. When the put's outcome is unknown (connection closed after the write, timeout, 5xx), nothing
   is deleted until it is resolved: a conditional *tombstone* (``status = aborted`` naming this
   attempt) is written. If it lands, this attempt's put can never land later (its condition
   excludes tombstoned attempts), so the objects are deleted and the caller gets a retryable
   error; if its condition fails, the item exists and is read back (ours → success, another
   attempt's → replay or conflict). If even that cannot be decided, the objects are kept.
5. After a successful put, and on every replay, objects under this request's prefix that the item
   does not reference are swept (:meth:`ResultStore.sweep`): left by earlier attempts whose cleanup
   failed, or by an attempt that died (Lambda timeout, a killed edge agent) between its S3 puts and
   its put after another attempt had stored the item - only a later replay can remove those.
   The prefix is the stored item's capture day: an attempt with another ``captured_at`` day (one
   that left it to default to "now" across midnight UTC) wrote elsewhere and is not reached.

Table layout (see :data:`TABLE_SCHEMA`): partition key ``camera_id``, sort key ``request_id`` —
the idempotency key must be derivable from the request alone, and ``captured_at`` defaults to
"now", so it cannot be part of the key. Time-ordered queries per camera use the GSI
``by_captured_at`` (``camera_id``, ``captured_at``); tombstones have no ``captured_at``, so they
are not in it.

Time budget: :meth:`ResultStore.deadline` sets, for the calling thread, the moment by which the
request must be answered (the Lambda's remaining time less a reserve). Every HTTP attempt to S3 or
DynamoDB, retries included, is started only if its worst case (connect + read timeout) ends before
that moment, together with the backoff botocore may sleep before the next attempt (at most
``min(2 ** (n - 1), 20)`` s after attempt ``n``, botocore's standard mode; a server's
``x-amz-retry-after`` could add more, which S3 and DynamoDB do not send); otherwise it raises
:class:`OutOfTime` unsent, which is a retryable storage error (503) like an unreachable store, and
a put refused on a retry counts as an unknown outcome (rule 4).

Endpoints come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL_DYNAMODB``), which boto3 honours by itself.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import boto3
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectionError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from serving.observability import service_logger

if TYPE_CHECKING:
    from core.inspection import Inspection
    from serving.events import ScoringRequest

GSI_BY_CAPTURED_AT = "by_captured_at"
TABLE_SCHEMA: dict[str, Any] = {
    "KeySchema": [
        {"AttributeName": "camera_id", "KeyType": "HASH"},
        {"AttributeName": "request_id", "KeyType": "RANGE"},
    ],
    "AttributeDefinitions": [
        {"AttributeName": "camera_id", "AttributeType": "S"},
        {"AttributeName": "request_id", "AttributeType": "S"},
        {"AttributeName": "captured_at", "AttributeType": "S"},
    ],
    "GlobalSecondaryIndexes": [
        {
            "IndexName": GSI_BY_CAPTURED_AT,
            "KeySchema": [
                {"AttributeName": "camera_id", "KeyType": "HASH"},
                {"AttributeName": "captured_at", "KeyType": "RANGE"},
            ],
            "Projection": {"ProjectionType": "ALL"},
        }
    ],
    "BillingMode": "PAY_PER_REQUEST",
}
ORIGINAL_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}
_RETRYABLE_CODES = {
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "SlowDown",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "TransactionConflictException",
}
# Errors after which the write certainly did not happen (no need to resolve an unknown outcome).
_DEFINITE_CODES = {
    "ResourceNotFoundException",
    "ValidationException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "NoSuchBucket",
    "AccessDenied",
}


class OutOfTime(BotoCoreError):
    """An attempt was not started: its worst case would end after the request's deadline.

    Raised from a ``before-send`` hook, so botocore neither sends nor retries it.
    ``kwargs["first_attempt"]`` tells whether an earlier attempt of the same call went out.
    """

    fmt = "not started: {left_s:.2f} s left before the deadline; attempt + backoff may take {attempt_s:.2f} s"


_TRANSIENT_ERRORS = (
    OutOfTime,
    EndpointConnectionError,
    ConnectionError,
    ConnectionClosedError,
    ReadTimeoutError,
    ConnectTimeoutError,
)
STATUS_COMPLETE = "complete"
STATUS_ABORTED = "aborted"

logger = service_logger(child=True)
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


class StorageError(RuntimeError):
    """S3 or DynamoDB failed; ``store`` names which (``"s3"`` / ``"dynamodb"``).

    ``retryable`` is true for transient faults (unreachable, connection lost, timeout, throttling,
    5xx): 503 with Retry-After; else 500. ``str()`` has the details for the logs;
    :attr:`public_message` is what a client may see (the store only: no endpoint, bucket or key).
    """

    def __init__(self, store: str, operation: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{store} {operation} failed: {message}")
        self.store = store
        self.operation = operation
        self.retryable = retryable

    @property
    def public_message(self) -> str:
        if self.retryable:
            return f"{self.store} is temporarily unavailable; retry the request with the same idempotency key"
        return f"{self.store} failed; the result was not stored"


class IdempotencyConflict(Exception):
    """The request id is already used by a request with another fingerprint (image/camera/options)."""

    def __init__(self, existing: dict[str, Any]) -> None:
        super().__init__("idempotency key already used for a different request")
        self.existing = existing


class InvalidPageToken(ValueError):
    """A ``next_token`` that this store did not issue for this camera."""


class ConfigurationError(RuntimeError):
    """A required environment variable is missing."""


@dataclass(frozen=True)
class ResultRecord:
    """Everything about one scored image that goes into the DynamoDB item (besides S3 keys)."""

    camera_id: str
    request_id: str
    captured_at: str
    score: float
    is_anomalous: bool
    threshold: float
    model_name: str
    model_version: str
    latency_ms: dict[str, float] = field(default_factory=dict)
    image_width: int = 0
    image_height: int = 0
    fingerprint: str = ""
    image_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # answer fields (confidence, regions, ...)

    @classmethod
    def scored(
        cls,
        request: ScoringRequest,
        inspection: Inspection,
        *,
        model_name: str,
        model_version: str,
        latency_ms: dict[str, float],
        extra: dict[str, Any] | None = None,
    ) -> ResultRecord:
        """The record of one scored request: one builder for the Lambda and the edge agent, so an
        edge result and a cloud result of the same image carry the same fields."""
        return cls(
            camera_id=request.camera_id,
            request_id=request.request_id,
            captured_at=request.captured_at,
            score=inspection.score,
            is_anomalous=inspection.is_anomalous,
            threshold=inspection.threshold,
            model_name=model_name,
            model_version=model_version,
            latency_ms=latency_ms,
            image_width=request.original_size[0],
            image_height=request.original_size[1],
            fingerprint=request.fingerprint,
            image_sha256=request.image_sha256,
            extra={**inspection.answer_fields(), **(extra or {})},
        )


@dataclass(frozen=True)
class SaveOutcome:
    """The stored item (plain Python values) and whether it was already there (a replay)."""

    item: dict[str, Any]
    replayed: bool


def _wrap_error(store: str, operation: str, exc: Exception) -> StorageError:
    """Translate boto errors into :class:`StorageError` with a message that names the cause."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "Unknown")
        message = exc.response.get("Error", {}).get("Message", "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return StorageError(
            store,
            operation,
            f"{code}: {message}".rstrip(": "),
            retryable=code in _RETRYABLE_CODES or status >= 500,
        )
    return StorageError(
        store, operation, f"{type(exc).__name__}: {exc}", retryable=isinstance(exc, _TRANSIENT_ERRORS)
    )


def _is_definite_failure(exc: Exception) -> bool:
    """Whether the write certainly did not happen (validation, missing table, throttled, refused)."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code") in _DEFINITE_CODES
    if isinstance(exc, OutOfTime):  # unsent; but an earlier attempt of the same call may have landed
        return bool(exc.kwargs.get("first_attempt"))
    return isinstance(exc, EndpointConnectionError | ConnectTimeoutError)


def _is_condition_failure(exc: Exception) -> bool:
    return (
        isinstance(exc, ClientError)
        and exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
    )


def to_dynamodb(value: Any) -> Any:
    """Floats become ``Decimal`` (DynamoDB rejects floats); via ``repr`` so no binary noise appears."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: to_dynamodb(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_dynamodb(v) for v in value]
    return value


def from_dynamodb(value: Any) -> Any:
    """``Decimal`` back to ``int``/``float`` so items can be JSON-encoded for responses."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and "." not in str(value) else float(value)
    if isinstance(value, dict):
        return {k: from_dynamodb(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_dynamodb(v) for v in value]
    return value


def default_client_config() -> Config:
    """Short timeouts and few retries: a Lambda request should fail fast rather than hang."""
    return Config(
        connect_timeout=float(os.environ.get("AWS_CONNECT_TIMEOUT", "2")),
        read_timeout=float(os.environ.get("AWS_READ_TIMEOUT", "5")),
        retries={"mode": "standard", "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))},
    )


class ResultStore:
    """Writes results to S3 + DynamoDB with the consistency rules in the module docstring."""

    def __init__(
        self,
        table_name: str,
        bucket: str,
        prefix: str = "results/",
        *,
        store_original: bool = False,
        s3_client: Any = None,
        dynamodb_client: Any = None,
    ) -> None:
        self.table_name = table_name
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.store_original = store_original
        config = default_client_config()
        self.s3 = s3_client or boto3.client("s3", config=config)
        self.dynamodb = dynamodb_client or boto3.client("dynamodb", config=config)
        self._local = threading.local()  # the calling request's deadline (threads share a store)
        for client in (self.s3, self.dynamodb):
            client_config = client.meta.config
            attempt_s = float(client_config.connect_timeout or 60) + float(client_config.read_timeout or 60)
            retries = client_config.retries or {}
            max_attempts = int(retries.get("total_max_attempts") or retries.get("max_attempts", 4) + 1)
            client.meta.events.register(
                "before-send",
                functools.partial(self._refuse_late_attempt, attempt_s=attempt_s, max_attempts=max_attempts),
            )

    @contextmanager
    def deadline(self, at: float | None) -> Iterator[None]:
        """Calls from this thread must finish by ``at`` (``time.monotonic()``); ``None``: no limit."""
        previous = getattr(self._local, "deadline", None)
        self._local.deadline = at
        try:
            yield
        finally:
            self._local.deadline = previous

    def _refuse_late_attempt(self, request: Any, attempt_s: float, max_attempts: int, **_: Any) -> None:
        """``before-send`` hook: raise :class:`OutOfTime` for an attempt that might end past the deadline.

        The attempt and the backoff sleep that may follow it must both fit: botocore sleeps before it
        calls this hook again, so an unchecked sleep could outlast the deadline.
        """
        at = getattr(self._local, "deadline", None)
        if at is None:
            return
        attempt = int(((getattr(request, "context", None) or {}).get("retries") or {}).get("attempt", 1))
        backoff_s = 0.0 if attempt >= max_attempts else min(2.0 ** (attempt - 1), 20.0)
        left = at - time.monotonic()
        if left < attempt_s + backoff_s:
            raise OutOfTime(left_s=left, attempt_s=attempt_s + backoff_s, first_attempt=attempt == 1)

    @classmethod
    def from_env(cls) -> ResultStore:
        """Build from ``RESULTS_TABLE``, ``RESULTS_BUCKET``, ``RESULTS_PREFIX``, ``STORE_ORIGINAL``."""
        table = os.environ.get("RESULTS_TABLE")
        bucket = os.environ.get("RESULTS_BUCKET")
        missing = [
            name for name, value in (("RESULTS_TABLE", table), ("RESULTS_BUCKET", bucket)) if not value
        ]
        if missing:
            raise ConfigurationError(f"missing environment variable(s): {', '.join(missing)}")
        assert table and bucket  # for the type checker
        return cls(
            table,
            bucket,
            os.environ.get("RESULTS_PREFIX", "results/"),
            store_original=os.environ.get("STORE_ORIGINAL", "").strip().lower() in {"1", "true", "yes"},
        )

    # -- keys -------------------------------------------------------------------------------
    def request_prefix(self, camera_id: str, captured_at: str, request_id: str) -> str:
        """``{prefix}{camera_id}/{YYYY/MM/DD}/{request_id}/``: every attempt's objects live below it.

        The date comes from ``captured_at`` (``YYYY-MM-DD...``), so objects group by capture day.
        """
        day = f"{captured_at[0:4]}/{captured_at[5:7]}/{captured_at[8:10]}"
        return f"{self.prefix}{camera_id}/{day}/{request_id}/"

    def object_keys(
        self,
        camera_id: str,
        captured_at: str,
        request_id: str,
        attempt_id: str,
        original_content_type: str | None = None,
    ) -> dict[str, str]:
        """This attempt's keys under :meth:`request_prefix`.

        ``{attempt_id}-overlay.png``, ``{attempt_id}-mask.png`` and ``{attempt_id}-original.<ext>``.
        """
        base = self.request_prefix(camera_id, captured_at, request_id) + attempt_id
        keys = {"overlay": f"{base}-overlay.png", "mask": f"{base}-mask.png"}
        if self.store_original and original_content_type:
            keys["original"] = f"{base}-original.{ORIGINAL_EXTENSIONS.get(original_content_type, 'bin')}"
        return keys

    def uri(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A time-limited GET URL for one stored object (computed locally: no request is made)."""
        try:
            return self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        except (ClientError, BotoCoreError) as exc:
            raise _wrap_error("s3", "presign", exc) from exc

    # -- reads ------------------------------------------------------------------------------
    def get(self, camera_id: str, request_id: str) -> dict[str, Any] | None:
        """The stored, complete item for this request (strongly consistent), or ``None``.

        Tombstones (``status = aborted``) read as ``None``: nothing was stored for them.
        """
        item = self._get_raw(camera_id, request_id)
        return item if item is not None and item.get("status", STATUS_COMPLETE) == STATUS_COMPLETE else None

    def lookup(self, camera_id: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored item a retried request replays (``None``: not stored yet, score it), swept.

        Raises :class:`IdempotencyConflict` if the item was stored for another ``fingerprint``
        (image, camera or options). On a replay the request's prefix is swept (rule 5): an attempt
        that died between its S3 puts and its put leaves objects only a replay can see.
        """
        existing = self.get(camera_id, request_id)
        if existing is None:
            return None
        stored = existing.get("fingerprint")
        if stored and fingerprint and stored != fingerprint:
            raise IdempotencyConflict(existing)
        self.sweep(existing)
        return existing

    def _get_raw(self, camera_id: str, request_id: str) -> dict[str, Any] | None:
        try:
            response = self.dynamodb.get_item(
                TableName=self.table_name,
                Key={"camera_id": {"S": camera_id}, "request_id": {"S": request_id}},
                ConsistentRead=True,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _wrap_error("dynamodb", "get_item", exc) from exc
        item = response.get("Item")
        return self._decode(item) if item else None

    def read_object(self, key: str) -> bytes:
        """The bytes of one stored object (e.g. the mask for ``mask=base64`` on a replay)."""
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _wrap_error("s3", "get_object", exc) from exc

    def query(
        self,
        camera_id: str,
        *,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        next_token: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a camera's results by ``captured_at`` (oldest first) and the next page's token."""
        condition = "camera_id = :c"
        values: dict[str, Any] = {":c": {"S": camera_id}}
        if since and until:
            condition += " AND captured_at BETWEEN :s AND :u"
            values.update({":s": {"S": since}, ":u": {"S": until}})
        elif since:
            condition += " AND captured_at >= :s"
            values[":s"] = {"S": since}
        elif until:
            condition += " AND captured_at <= :u"
            values[":u"] = {"S": until}
        kwargs: dict[str, Any] = {
            "TableName": self.table_name,
            "IndexName": GSI_BY_CAPTURED_AT,
            "KeyConditionExpression": condition,
            "ExpressionAttributeValues": values,
            "Limit": limit,
        }
        if next_token:
            kwargs["ExclusiveStartKey"] = decode_page_token(next_token, camera_id)
        try:
            response = self.dynamodb.query(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _wrap_error("dynamodb", "query", exc) from exc
        items = [self._decode(i) for i in response.get("Items", [])]
        last = response.get("LastEvaluatedKey")
        return items, encode_page_token(last) if last else None

    @staticmethod
    def _decode(item: dict[str, Any]) -> dict[str, Any]:
        return from_dynamodb({k: _deserializer.deserialize(v) for k, v in item.items()})

    # -- writes -----------------------------------------------------------------------------
    def save(
        self,
        record: ResultRecord,
        overlay_png: bytes,
        *,
        mask_png: bytes | None = None,
        original: bytes | None = None,
        original_content_type: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> SaveOutcome:
        """Write this attempt's S3 objects, then the item conditionally; see the module docstring.

        Raises :class:`StorageError` (nothing stored, or an undecidable outcome with the
        objects kept) or :class:`IdempotencyConflict` (another request owns the id). ``timings``
        receives each write's milliseconds (``s3_put_<kind>``, ``dynamodb_put``), also when it fails.
        """
        timings = {} if timings is None else timings
        attempt_id = uuid.uuid4().hex[:16]
        keys = self.object_keys(
            record.camera_id,
            record.captured_at,
            record.request_id,
            attempt_id,
            original_content_type if original is not None else None,
        )
        bodies: dict[str, tuple[bytes, str]] = {"overlay": (overlay_png, "image/png")}
        if mask_png is not None:
            bodies["mask"] = (mask_png, "image/png")
        if "original" in keys and original is not None and original_content_type:
            bodies["original"] = (original, original_content_type)

        written: list[str] = []
        for kind, (body, content_type) in bodies.items():
            try:
                with _timed(timings, f"s3_put_{kind}"):
                    self.s3.put_object(
                        Bucket=self.bucket, Key=keys[kind], Body=body, ContentType=content_type
                    )
            except (ClientError, BotoCoreError) as exc:
                written.append(keys[kind])  # the PUT may have landed: deleting a missing key is a no-op
                self._delete_objects(written)
                raise _wrap_error("s3", f"put_object {kind}", exc) from exc
            written.append(keys[kind])

        item = {
            **record.extra,
            "camera_id": record.camera_id,
            "request_id": record.request_id,
            "captured_at": record.captured_at,
            "score": record.score,
            "is_anomalous": record.is_anomalous,
            "threshold": record.threshold,
            "model_name": record.model_name,
            "model_version": record.model_version,
            "latency_ms": {k: round(v, 3) for k, v in record.latency_ms.items()},
            "image_width": record.image_width,
            "image_height": record.image_height,
            "fingerprint": record.fingerprint,
            "image_sha256": record.image_sha256,
            "attempt_id": attempt_id,
            "status": STATUS_COMPLETE,
            "bucket": self.bucket,
            "overlay_key": keys["overlay"],
            "result_uri": self.uri(keys["overlay"]),
        }
        if "mask" in bodies:
            item["mask_key"] = keys["mask"]
        if "original" in bodies:
            item["original_key"] = keys["original"]
            item["original_uri"] = self.uri(keys["original"])
        item.update(expiry_attributes())
        try:
            with _timed(timings, "dynamodb_put"):
                self.dynamodb.put_item(
                    TableName=self.table_name,
                    Item={k: _serializer.serialize(v) for k, v in to_dynamodb(item).items()},
                    ConditionExpression="attribute_not_exists(request_id) OR "
                    "(#s = :aborted AND NOT contains(aborted_attempts, :attempt))",
                    ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues={
                        ":aborted": {"S": STATUS_ABORTED},
                        ":attempt": {"S": attempt_id},
                    },
                )
        except (ClientError, BotoCoreError) as exc:
            if _is_condition_failure(exc):
                return self._resolve_existing(record, attempt_id, written)
            if _is_definite_failure(exc):
                self._delete_objects(written)
                raise _wrap_error("dynamodb", "put_item", exc) from exc
            logger.warning(
                "put_item outcome unknown; resolving before deleting anything",
                extra={"error": f"{type(exc).__name__}: {exc}", "attempt_id": attempt_id},
            )
            return self._resolve_unknown(
                record, attempt_id, written, _wrap_error("dynamodb", "put_item", exc)
            )
        self.sweep(item)
        return SaveOutcome(item=from_dynamodb(to_dynamodb(item)), replayed=False)

    def _resolve_existing(self, record: ResultRecord, attempt_id: str, written: list[str]) -> SaveOutcome:
        """The conditional put failed: an item exists. Ours (a retried put that landed) → success;
        another attempt's → replay if it is the same request, else conflict. Our objects go only
        when the stored item is not ours."""
        existing = self._get_raw(record.camera_id, record.request_id)
        if existing is None or existing.get("status", STATUS_COMPLETE) != STATUS_COMPLETE:
            # Tombstoned or gone between the put and the read: nothing references our objects.
            self._delete_objects(written)
            raise StorageError(
                "dynamodb", "put_item", "conditional put lost to a concurrent attempt", retryable=True
            )
        if existing.get("attempt_id") == attempt_id:
            self.sweep(existing)
            return SaveOutcome(item=existing, replayed=False)
        referenced = {existing.get(k) for k in ("overlay_key", "mask_key", "original_key")}
        self._delete_objects([key for key in written if key not in referenced])
        stored_fingerprint = existing.get("fingerprint")
        if stored_fingerprint and record.fingerprint and stored_fingerprint != record.fingerprint:
            raise IdempotencyConflict(existing)
        return SaveOutcome(item=existing, replayed=True)

    def _resolve_unknown(
        self, record: ResultRecord, attempt_id: str, written: list[str], cause: StorageError
    ) -> SaveOutcome:
        """Decide an unknown put outcome with a conditional tombstone before deleting anything."""
        # A tombstone expires like the item it stands in for (DynamoDB TTL), so a request that was
        # never retried does not leave it in the table for good.
        expires = expiry_attributes()
        expiry = {f":{k}": {"N": str(v)} for k, v in expires.items()}
        set_expiry = "".join(f", {k} = :{k}" for k in expires)
        try:
            self.dynamodb.update_item(
                TableName=self.table_name,
                Key={"camera_id": {"S": record.camera_id}, "request_id": {"S": record.request_id}},
                UpdateExpression=f"SET #s = :aborted{set_expiry} ADD aborted_attempts :attempts",
                ConditionExpression="attribute_not_exists(request_id) OR #s = :aborted",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":aborted": {"S": STATUS_ABORTED},
                    ":attempts": {"SS": [attempt_id]},
                    **expiry,
                },
            )
        except (ClientError, BotoCoreError) as exc:
            if _is_condition_failure(exc):  # a complete item is there: read it back
                return self._resolve_existing(record, attempt_id, written)
            logger.error(
                "put_item outcome undecidable; keeping this attempt's objects",
                extra={"kept_keys": written, "error": f"{type(exc).__name__}: {exc}"},
            )
            raise cause from exc
        # Tombstoned: this attempt's put can never land now, so its objects are garbage.
        self._delete_objects(written)
        raise cause

    def sweep(self, item: dict[str, Any]) -> None:
        """Delete the objects under a stored item's request prefix that it does not reference.

        Best effort (a failure is logged, never raised). Safe once the item is stored: no other
        attempt can commit any more, so only the keys the item references are live; an attempt
        still in flight finds the item at its conditional put and deletes its own objects anyway.
        """
        prefix = self.request_prefix(item["camera_id"], item["captured_at"], item["request_id"])
        referenced = {item.get(k) for k in ("overlay_key", "mask_key", "original_key")}
        try:
            listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=100)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("could not list objects to sweep", extra={"error": str(exc), "prefix": prefix})
            return
        stale = [o["Key"] for o in listing.get("Contents", []) if o["Key"] not in referenced]
        if stale:
            self._delete_objects(stale)

    def _delete_objects(self, keys: list[str]) -> list[str]:
        """Best-effort cleanup; returns the keys that could not be deleted (they are only logged)."""
        failed: list[str] = []
        for key in keys:
            try:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
            except (ClientError, BotoCoreError):
                failed.append(key)
        if failed:
            logger.warning("could not delete S3 objects after a failed write", extra={"orphan_keys": failed})
        return failed


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Milliseconds of the block into ``timings[name]``, also when it raises (failed writes count)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = (time.perf_counter() - started) * 1000.0


def encode_page_token(last_evaluated_key: dict[str, Any]) -> str:
    """An opaque ``next_token``: the GSI's LastEvaluatedKey as URL-safe base64 JSON."""
    plain = {k: v["S"] for k, v in last_evaluated_key.items() if "S" in v}
    return base64.urlsafe_b64encode(json.dumps(plain, sort_keys=True).encode()).decode().rstrip("=")


def decode_page_token(token: str, camera_id: str) -> dict[str, Any]:
    """Inverse of :func:`encode_page_token`; refuses tokens of another camera or another shape."""
    try:
        plain = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: a forged token of deeply nested JSON; ValueError also covers integers
        # over the 4,300-digit conversion limit.
        raise InvalidPageToken("next_token is not a token this API issued") from exc
    names = {"camera_id", "request_id", "captured_at"}
    if (
        not isinstance(plain, dict)
        or set(plain) != names
        or not all(isinstance(v, str) for v in plain.values())
        or plain["camera_id"] != camera_id
    ):
        raise InvalidPageToken("next_token is not a token this API issued for this camera")
    return {k: {"S": v} for k, v in plain.items()}


def create_resources(
    table_name: str, bucket: str, *, s3_client: Any = None, dynamodb_client: Any = None
) -> None:
    """Create the results table (with :data:`TABLE_SCHEMA`) and bucket; for local servers and tests."""
    s3 = s3_client or boto3.client("s3")
    dynamodb = dynamodb_client or boto3.client("dynamodb")
    s3.create_bucket(Bucket=bucket)
    dynamodb.create_table(TableName=table_name, **TABLE_SCHEMA)
    dynamodb.get_waiter("table_exists").wait(
        TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )


TTL_ATTRIBUTE = "expires_at"


def expiry_attributes(now: float | None = None) -> dict[str, int]:
    """``{"expires_at": epoch seconds}`` when ``RESULTS_TTL_DAYS`` is set, else ``{}``.

    The deployed table (infra/) expires items on this attribute (DynamoDB TTL) when the stage has a
    retention period, and the bucket's lifecycle rule expires the objects some days later: both
    count from the write, so an item is gone before the overlay it points at.
    """
    days = os.environ.get("RESULTS_TTL_DAYS", "").strip()
    if not days:
        return {}
    try:
        seconds = float(days) * 86400
    except ValueError as exc:
        raise ConfigurationError(f"RESULTS_TTL_DAYS={days!r} is not a number of days") from exc
    return {TTL_ATTRIBUTE: int((time.time() if now is None else now) + seconds)}
