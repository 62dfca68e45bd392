"""Exactly-once sync of the outbox into the Lambda's DynamoDB table and S3 layout.

Why it cannot store anything twice: every edge result has a stable ``request_id`` chosen when it
was scored, and it is written through :meth:`serving.storage.ResultStore.save` - the Lambda's own
writer, with its conditional put, tombstones and sweep of earlier attempts' objects. A sync that is
retried after a timeout, a dropped connection or a kill -9 of the agent finds the item it stored
before and replays it (same fingerprint); only then is the local row marked synced. So the cloud
never holds an item without its objects or an object without its item, exactly as for the Lambda.

Order and pace: results go in commit order per camera (a camera whose oldest pending result fails
waits; other cameras carry on), in batches of ``cloud.batch_size``, cameras in parallel up to
``cloud.workers``. After a failed batch the next try waits an exponentially growing, jittered
delay (``backoff_initial_s`` doubling up to ``backoff_max_s``, drawn uniformly from the upper half
of that cap), so a fleet of agents coming back online does not hammer the API at the same instant.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge.config import CloudConfig
from edge.crash import crash_point
from edge.outbox import CONFLICT, SYNCED, Entry, Outbox
from serving.storage import IdempotencyConflict, ResultStore, StorageError

log = logging.getLogger("edge.sync")


def make_store(cloud: CloudConfig) -> ResultStore:
    """The Lambda's ResultStore pointed at the configured table, bucket and (optional) endpoint."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=cloud.connect_timeout_s,
        read_timeout=cloud.read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": 2},
    )
    kwargs: dict[str, Any] = {"config": config}
    if cloud.region:
        kwargs["region_name"] = cloud.region
    elif not boto3.session.Session().region_name:
        from edge.config import ConfigError

        raise ConfigError("cloud.region: required (or set AWS_REGION / AWS_DEFAULT_REGION)")
    if cloud.endpoint_url:
        kwargs["endpoint_url"] = cloud.endpoint_url
    return ResultStore(
        cloud.table,
        cloud.bucket,
        cloud.prefix,
        s3_client=boto3.client("s3", **kwargs),
        dynamodb_client=boto3.client("dynamodb", **kwargs),
    )


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": uniform in [cap/2, cap], cap = min(max, initial*2**(n-1)).

    Not full jitter (uniform from 0): a retry right after a failure would only meet the same outage.
    """
    if failures <= 0:
        return 0.0
    cap = min(maximum, initial * 2 ** min(failures - 1, 30))
    return (rng or random).uniform(cap / 2, cap)


class Syncer:
    """A thread that drains the outbox into the cloud; :meth:`sync_once` is one bounded pass."""

    def __init__(
        self, outbox: Outbox, store: ResultStore, cloud: CloudConfig, *, agent_id: str, metrics: Any
    ):
        self.outbox = outbox
        self.store = store
        self.cloud = cloud
        self.agent_id = agent_id
        self.metrics = metrics
        self.failures = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.next_try = 0.0
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=cloud.workers, thread_name_prefix="sync")
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = max(self.next_try - time.monotonic(), 0.0)
            if wait and self._stop.wait(wait):
                return
            try:
                moved = self.sync_once()
            except Exception:  # a bug must not kill the thread: log and back off
                log.exception("sync pass failed")
                moved = 0
                self._failed("internal error")
            if moved == 0 and self._stop.wait(self.cloud.interval_s):
                return

    def sync_once(self) -> int:
        """Sync up to ``batch_size * workers`` pending results; returns how many reached the cloud."""
        entries = self.outbox.pending(self.cloud.batch_size * self.cloud.workers)
        if not entries:
            return 0
        by_camera: OrderedDict[str, list[Entry]] = OrderedDict()
        for entry in entries:
            by_camera.setdefault(entry.camera_id, []).append(entry)
        batches = [group[: self.cloud.batch_size] for group in by_camera.values()]
        results = list(self._pool.map(self._sync_camera, batches))
        moved = sum(n for n, _ in results)
        if moved:
            self.outbox.checkpoint()  # the updates above grew the WAL past the last cap check
        errors = [e for _, e in results if e]
        if errors:
            self._failed(errors[0])
        else:
            self.failures = 0
            self.next_try = 0.0
        if moved:
            self.last_success = time.time()
        return moved

    def _failed(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        delay = backoff_delay(self.failures, self.cloud.backoff_initial_s, self.cloud.backoff_max_s)
        self.next_try = time.monotonic() + delay
        self.metrics.inc("vi_edge_sync_failures_total")
        log.warning(
            "sync failed; backing off", extra={"error": error, "failures": self.failures, "delay_s": delay}
        )

    def _sync_camera(self, entries: list[Entry]) -> tuple[int, str | None]:
        """One camera's batch in order; stops at the first failure so order is kept."""
        done = 0
        for entry in entries:
            try:
                uri = self._sync_one(entry)
            except StorageError as exc:
                return done, str(exc)
            except IdempotencyConflict:
                # Another request owns this id in the cloud: never overwrite it; keep ours locally.
                self.outbox.mark(entry.seq, CONFLICT)
                self.metrics.inc("vi_edge_sync_conflicts_total")
                log.error("sync conflict: the cloud holds another result under this id",
                          extra={"camera_id": entry.camera_id, "request_id": entry.request_id})  # fmt: skip
                continue
            self.outbox.mark(entry.seq, SYNCED, uri)
            self.metrics.inc("vi_edge_synced_total")
            done += 1
        return done, None

    def _sync_one(self, entry: Entry) -> str:
        overlay, mask = self.outbox.read_files(entry)
        extra = dict(entry.record.extra)
        if entry.overlay_evicted or entry.overlay_file is None:
            extra["overlay_evicted"] = True
        record = dataclasses.replace(entry.record, extra=extra)
        # Look up first, as the Lambda does before scoring: an earlier life of this agent may have
        # stored the item and died before marking it synced. Writing new objects then would only
        # create objects for save() to delete again - and if this life died in between, objects
        # no item references. The store's lookup sweeps the request's prefix on a found item, so
        # objects of an attempt killed between its S3 puts and its put are not left behind.
        existing = self.store.lookup(record.camera_id, record.request_id, record.fingerprint)
        if existing is not None:
            self.metrics.inc("vi_edge_sync_replayed_total")
            return str(existing.get("result_uri") or "")
        outcome = self.store.save(record, overlay, mask_png=mask)
        crash_point("after_put")
        if outcome.replayed:
            self.metrics.inc("vi_edge_sync_replayed_total")
        return str(outcome.item.get("result_uri") or "")

    def status(self) -> dict[str, Any]:
        return {
            "last_success": self.last_success,
            "last_error": self.last_error,
            "consecutive_failures": self.failures,
            "next_try_in_s": round(max(self.next_try - time.monotonic(), 0.0), 3),
        }
