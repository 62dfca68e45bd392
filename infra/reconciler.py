"""Scheduled reconciler: delete result objects that no DynamoDB item references, after a grace period.

Why: the handler writes objects first and the item second, and keeps the objects when a write's
outcome cannot be decided (see serving/storage.py). A crash between the two, or an undecided
write that was never retried, leaves objects nobody can reach; they are billed forever. An object is
an orphan when it is older than the grace period (no write takes that long) and the item of its
request (camera id, request id, read from the key) is missing or references other keys. Keys that
do not have the storage layout ``{prefix}{camera}/{YYYY}/{MM}/{DD}/{request_id}/{file}`` are never
touched. Items whose TTL expired lose their objects here too, up to the bucket's expiry grace earlier.

The stack deploys this file as the function's inline code (docstrings and comments stripped, which
must fit CloudFormation's 4 KB ``ZipFile``), so it imports only the standard library and boto3, which
the Lambda Python runtime provides. Each run logs an Embedded Metric Format line: the
``OrphansRemoved`` and ``ObjectsScanned`` counts become CloudWatch metrics without extra calls.
"""

import json
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

Request = tuple[str, str]


def request_of(key: str, prefix: str) -> Request | None:
    """``(camera_id, request_id)`` of a result object key, or None for any other layout."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix) :].split("/")
    if len(parts) != 6 or not all(parts) or not all(p.isdigit() for p in parts[1:4]):
        return None
    return parts[0], parts[4]


def orphans(
    objects: Iterable[dict[str, Any]],
    referenced: dict[Request, set[str]],
    prefix: str,
    now: datetime,
    grace: timedelta,
) -> list[str]:
    """Keys of ``objects`` (``Key``, ``LastModified``) older than ``grace`` that no item references.

    ``referenced`` maps ``(camera_id, request_id)`` to the keys its item names; a request without
    an item is absent.
    """
    doomed = []
    for obj in objects:
        request = request_of(obj["Key"], prefix)
        if request is None or now - obj["LastModified"] < grace:
            continue
        if obj["Key"] not in referenced.get(request, ()):
            doomed.append(obj["Key"])
    return doomed


def referenced_keys(ddb: Any, table: str, requests: Iterable[Request]) -> dict[Request, set[str]]:
    """``{(camera_id, request_id): {keys the item names}}`` for the requests that have an item."""
    found: dict[Request, set[str]] = {}
    ordered = sorted(requests)
    for start in range(0, len(ordered), 100):
        keys = [{"camera_id": {"S": c}, "request_id": {"S": r}} for c, r in ordered[start : start + 100]]
        pending = {table: {"Keys": keys}}
        while pending:
            reply = ddb.batch_get_item(RequestItems=pending)
            for item in reply["Responses"].get(table, []):
                names = {v["S"] for k, v in item.items() if k.endswith("_key") and "S" in v}
                found[(item["camera_id"]["S"], item["request_id"]["S"])] = names
            pending = reply.get("UnprocessedKeys") or {}
            if pending:
                time.sleep(0.2)
    return found


def handler(event: Any, context: Any) -> dict[str, int]:
    """List the prefix page by page, delete the orphans, log and return the counts."""
    import boto3

    s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
    env = os.environ
    bucket, table, prefix = env["RESULTS_BUCKET"], env["RESULTS_TABLE"], env["RESULTS_PREFIX"]
    grace = timedelta(hours=float(env["GRACE_HOURS"]))
    now = datetime.now(UTC)
    scanned = removed = failed = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects = page.get("Contents", [])
        scanned += len(objects)
        old = [o for o in objects if now - o["LastModified"] >= grace]
        requests = {r for r in (request_of(o["Key"], prefix) for o in old) if r}
        doomed = orphans(old, referenced_keys(ddb, table, requests), prefix, now, grace)
        for start in range(0, len(doomed), 1000):
            batch = [{"Key": k} for k in doomed[start : start + 1000]]
            reply = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            errors = reply.get("Errors", [])
            removed += len(batch) - len(errors)
            failed += len(errors)
    counts = {"ObjectsScanned": scanned, "OrphansRemoved": removed, "DeleteErrors": failed}
    metrics = [{"Name": name, "Unit": "Count"} for name in counts]
    namespace = {"Namespace": "visual-inspection", "Dimensions": [["Stage"]], "Metrics": metrics}
    emf = {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": [namespace]}
    print(json.dumps({"_aws": emf, "Stage": env.get("DEPLOY_STAGE", ""), **counts}))
    return counts
