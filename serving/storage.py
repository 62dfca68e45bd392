"""Persist scoring results: overlay (and optionally the original) to S3, the record to DynamoDB.

Consistency rules, in the order they are applied:

1. A retried request (same ``camera_id`` + ``request_id``) is detected with :meth:`ResultStore.get`
   before any scoring, and the stored result is returned unchanged.
2. S3 objects are written first, then the DynamoDB item with a conditional put
   (``attribute_not_exists``): a DynamoDB record never points at an S3 object that is not there,
   and a concurrent duplicate cannot store a second record.
3. If the DynamoDB write fails, the S3 objects written by this call are deleted (best effort), so
   a failed request leaves no orphan behind. If it lost a race to a concurrent duplicate, the
   winner's record is returned and objects the winner references are kept.

Table layout (see :data:`TABLE_SCHEMA`): partition key ``camera_id``, sort key ``request_id`` —
the idempotency key must be derivable from the request alone, and ``captured_at`` defaults to
"now", so it cannot be part of the key. Time-ordered queries per camera use the GSI
``by_captured_at`` (``camera_id``, ``captured_at``).

Endpoints come from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL_DYNAMODB``), which boto3 honours by itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, EndpointConnectionError

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
}

logger = Logger(service=os.environ.get("POWERTOOLS_SERVICE_NAME", "visual-inspection"), child=True)
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


class StorageError(RuntimeError):
    """S3 or DynamoDB failed; ``store`` names which (``"s3"`` / ``"dynamodb"``).

    ``retryable`` is true when the store was unreachable or throttling (maps to 503, else 500).
    """

    def __init__(self, store: str, operation: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{store} {operation} failed: {message}")
        self.store = store
        self.operation = operation
        self.retryable = retryable


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
        return StorageError(
            store, operation, f"{code}: {message}".rstrip(": "), retryable=code in _RETRYABLE_CODES
        )
    retryable = isinstance(exc, EndpointConnectionError | ConnectionError)
    return StorageError(store, operation, f"{type(exc).__name__}: {exc}", retryable=retryable)


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
        retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))},
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
    def object_keys(
        self, camera_id: str, captured_at: str, request_id: str, original_content_type: str | None = None
    ) -> dict[str, str]:
        """S3 keys ``{prefix}{camera_id}/{YYYY/MM/DD}/{request_id}-overlay.png`` (+ ``-original.<ext>``).

        The date comes from ``captured_at`` (``YYYY-MM-DD...``), so objects group by capture day.
        """
        day = f"{captured_at[0:4]}/{captured_at[5:7]}/{captured_at[8:10]}"
        base = f"{self.prefix}{camera_id}/{day}/{request_id}"
        keys = {"overlay": f"{base}-overlay.png"}
        if self.store_original and original_content_type:
            keys["original"] = f"{base}-original.{ORIGINAL_EXTENSIONS.get(original_content_type, 'bin')}"
        return keys

    def uri(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    # -- reads ------------------------------------------------------------------------------
    def get(self, camera_id: str, request_id: str) -> dict[str, Any] | None:
        """The stored item for this request (strongly consistent), or ``None``."""
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

    @staticmethod
    def _decode(item: dict[str, Any]) -> dict[str, Any]:
        return from_dynamodb({k: _deserializer.deserialize(v) for k, v in item.items()})

    # -- writes -----------------------------------------------------------------------------
    def save(
        self,
        record: ResultRecord,
        overlay_png: bytes,
        *,
        original: bytes | None = None,
        original_content_type: str | None = None,
    ) -> SaveOutcome:
        """Write S3 objects, then the DynamoDB item conditionally; see the module docstring."""
        keys = self.object_keys(
            record.camera_id,
            record.captured_at,
            record.request_id,
            original_content_type if original is not None else None,
        )
        bodies = {"overlay": (overlay_png, "image/png")}
        if "original" in keys and original is not None and original_content_type:
            bodies["original"] = (original, original_content_type)

        written: list[str] = []
        for kind, (body, content_type) in bodies.items():
            try:
                self.s3.put_object(Bucket=self.bucket, Key=keys[kind], Body=body, ContentType=content_type)
            except (ClientError, BotoCoreError) as exc:
                self._delete_objects(written)
                raise _wrap_error("s3", f"put_object {kind}", exc) from exc
            written.append(keys[kind])

        item = {
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
            "bucket": self.bucket,
            "overlay_key": keys["overlay"],
            "result_uri": self.uri(keys["overlay"]),
        }
        if "original" in bodies:
            item["original_key"] = keys["original"]
            item["original_uri"] = self.uri(keys["original"])
        item.update(expiry_attributes())
        try:
            self.dynamodb.put_item(
                TableName=self.table_name,
                Item={k: _serializer.serialize(v) for k, v in to_dynamodb(item).items()},
                ConditionExpression="attribute_not_exists(request_id)",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                return self._resolve_duplicate(record, written)
            self._delete_objects(written)
            raise _wrap_error("dynamodb", "put_item", exc) from exc
        except BotoCoreError as exc:
            self._delete_objects(written)
            raise _wrap_error("dynamodb", "put_item", exc) from exc
        return SaveOutcome(item=from_dynamodb(to_dynamodb(item)), replayed=False)

    def _resolve_duplicate(self, record: ResultRecord, written: list[str]) -> SaveOutcome:
        """A concurrent duplicate stored first: return its item, drop our objects it does not use."""
        existing = self.get(record.camera_id, record.request_id)
        if existing is None:  # pragma: no cover - the condition failed, so the item exists
            raise StorageError("dynamodb", "put_item", "conditional put failed but no item was found")
        referenced = {existing.get("overlay_key"), existing.get("original_key")}
        self._delete_objects([key for key in written if key not in referenced])
        return SaveOutcome(item=existing, replayed=True)

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
