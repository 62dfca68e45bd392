"""The agent: sources → one bounded queue → one scorer (core) → durable outbox → sync to the cloud.

Why one queue and one scoring thread: the line PC has few cores and the model uses them all for one
image; a second scorer would only add memory. Every source puts :class:`Job` s into the same
bounded queue with :meth:`Agent.try_submit`, which never blocks; what a source does when it is
full is its stated policy (:mod:`edge.sources`, :mod:`edge.httpapi`), counted in
``vi_edge_backpressure_total{source=...}``.

A job's answer is produced exactly as the Lambda produces it: the image is decoded and limited
by :func:`serving.events.decode_image` (the Lambda's decoder and limits), scored through
:func:`core.inspection.inspect_image`, and stored as the Lambda's
:class:`serving.storage.ResultRecord` with ``source: edge``, ``agent_id`` and the model version.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from core.inspection import inspect_image
from core.scoring import ScoringError
from edge.config import EdgeConfig
from edge.httpapi import EdgeHttpServer
from edge.jobs import Job, JobResult
from edge.metrics import Metrics, configure_logging
from edge.models import ModelManager
from edge.outbox import Outbox, OutboxFull
from edge.sources import make_source
from serving.events import RequestLimits
from serving.storage import IdempotencyConflict, ResultRecord

log = logging.getLogger("edge.agent")
BACKPRESSURE_LOG_S = 10.0
STATUS_LOG_S = 60.0


class Agent:
    """Owns the queue, the scoring thread, the outbox, the model slots, the syncer and the sources."""

    def __init__(self, config: EdgeConfig, *, s3_client: Any = None) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.limits = RequestLimits()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            config.state_dir / "outbox",
            max_bytes=config.outbox.max_bytes,
            keep_synced=config.outbox.keep_synced,
            fsync=config.outbox.fsync,
        )
        self.models = ModelManager(
            config.state_dir / "models", config.model, metrics=self.metrics, s3_client=s3_client
        )
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue.max_depth)
        self.syncer = None
        if config.cloud is not None:
            from edge.sync import Syncer, make_store

            self.syncer = Syncer(
                self.outbox,
                make_store(config.cloud),
                config.cloud,
                agent_id=config.agent_id,
                metrics=self.metrics,
            )
        self._stop = threading.Event()
        self._last_backpressure_log: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self.sources: list[Any] = []
        self.http: Any = None
        self.metrics.gauge_callback(self._gauges)

    # -- queue ------------------------------------------------------------------------------
    def try_submit(self, job: Job) -> bool:
        """Queue ``job`` unless the queue is full (never blocks); a refusal is counted per source
        and logged at most once per ``BACKPRESSURE_LOG_S`` per source (a flood must not flood the log)."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.metrics.inc("vi_edge_backpressure_total", labels={"source": job.source})
            now = time.monotonic()
            if now - self._last_backpressure_log.get(job.source, -BACKPRESSURE_LOG_S) >= BACKPRESSURE_LOG_S:
                self._last_backpressure_log[job.source] = now
                log.warning(
                    "scoring is behind: applying the source's backpressure policy",
                    extra={
                        "source": job.source,
                        "queue_depth": self.queue.qsize(),
                        "refused_total": self.metrics.value(
                            "vi_edge_backpressure_total", {"source": job.source}
                        ),
                    },
                )
            return False
        return True

    def queue_free(self) -> int:
        return self.config.queue.max_depth - self.queue.qsize()

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            result = self.process(job)
            try:
                job.done(result)
            except Exception:
                log.exception("job callback failed")
            finally:
                self.queue.task_done()

    def process(self, job: Job) -> JobResult:
        """Score one job and store it durably; every failure becomes ``JobResult.error``."""
        request = job.request
        labels = {"camera_id": request.camera_id, "source": job.source}
        try:
            existing = self.outbox.get(request.camera_id, request.request_id)
            if existing is not None:
                if existing.fingerprint != request.fingerprint:
                    raise IdempotencyConflict({"request_id": request.request_id})
                self.metrics.inc("vi_edge_replayed_total", labels=labels)
                return JobResult(entry=existing, replayed=True)
            live = self.models.live
            try:
                inspection = inspect_image(
                    live.scorer,
                    request.image,
                    request.original_size,
                    threshold=request.threshold,
                    sensitivity=request.sensitivity,
                )
            except ScoringError:
                self.models.scoring_failed()
                raise
            self.models.scoring_ok()
            meta = live.scorer.metadata
            record = ResultRecord.scored(
                request,
                inspection,
                model_name=meta.model_name,
                model_version=live.version,
                latency_ms={k: inspection.latency_ms[k] for k in ("score", "analyse", "overlay")},
                extra={
                    "source": "edge",
                    "agent_id": self.config.agent_id,
                    "edge_input": job.source,
                    "model_sha256": live.sha256,
                },
            )
            entry, replayed = self.outbox.add(
                record, inspection.overlay_png, inspection.mask_png, source=job.source
            )
        except OutboxFull as exc:
            self.metrics.inc("vi_edge_outbox_refused_total", labels=labels)
            return JobResult(error=exc)
        except Exception as exc:
            if not isinstance(exc, IdempotencyConflict):
                log.warning("scoring failed", extra={**labels, "error": f"{type(exc).__name__}: {exc}"})
            self.metrics.inc("vi_edge_errors_total", labels={**labels, "error": type(exc).__name__})
            return JobResult(error=exc)
        self.metrics.inc("vi_edge_scored_total", labels=labels)
        if entry.is_anomalous:
            self.metrics.inc("vi_edge_anomalies_total", labels=labels)
        self.metrics.inc("vi_edge_score_ms_total", inspection.latency_ms["score"])
        return JobResult(entry=entry, replayed=replayed, mask_png=None if replayed else inspection.mask_png)

    # -- status -----------------------------------------------------------------------------
    def _gauges(self) -> dict[str, float]:
        stats = self.outbox.stats()
        gauges = {
            "vi_edge_queue_depth": self.queue.qsize(),
            "vi_edge_queue_capacity": self.config.queue.max_depth,
            "vi_edge_outbox_results": stats["results"],
            "vi_edge_outbox_pending": stats["pending"],
            "vi_edge_outbox_bytes": stats["bytes"],
            "vi_edge_outbox_max_bytes": stats["max_bytes"],
            "vi_edge_outbox_evicted_normal_overlays": stats.get("evicted_normal_overlays", 0),
            "vi_edge_outbox_evicted_synced_files": stats.get("evicted_synced_files", 0),
            "vi_edge_uptime_seconds": time.time() - self.started_at,
        }
        if self.syncer is not None and self.syncer.last_success:
            gauges["vi_edge_last_sync_timestamp_seconds"] = self.syncer.last_success
        return gauges

    def status(self) -> dict[str, Any]:
        """The operator's DescribeModel: model, queue, outbox, sync, counters."""
        live = self.models._live
        return {
            "agent_id": self.config.agent_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "model": {
                "name": live.scorer.metadata.model_name if live else None,
                "version": live.version if live else None,
                "sha256": live.sha256 if live else None,
                "slot": live.slot if live else None,
                "input": [live.scorer.metadata.input.height, live.scorer.metadata.input.width]
                if live
                else None,
                "threshold": live.scorer.threshold if live else None,
                "follow": self.config.model.follow,
                "last_check": self.models.last_check,
                "rejected": sorted(self.models.rejected),
            },
            "queue": {"depth": self.queue.qsize(), "capacity": self.config.queue.max_depth},
            "outbox": self.outbox.stats(),
            "sync": self.syncer.status() if self.syncer else None,
            "sources": [s.status() for s in self.sources],
            "counters": self.metrics.counters(),
        }

    # -- lifecycle --------------------------------------------------------------------------
    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _report_loop(self) -> None:
        """One JSON status line a minute: queue, outbox, sync and every counter (drops, refusals)."""
        while not self._stop.wait(STATUS_LOG_S):
            status = self.status()
            log.info(
                "status",
                extra={k: status[k] for k in ("model", "queue", "outbox", "sync", "counters")},
            )

    def _follow_loop(self) -> None:
        """Check the published champion now, then every ``model.poll_s`` (never blocks scoring)."""
        while True:
            self.models.poll()
            if self._stop.wait(self.config.model.poll_s):
                return

    def start(self) -> None:
        """Load the model, then start scoring, sync, model follow, HTTP and sources (in that order)."""

        self.models.start()
        if self.models._live is None and self.config.model.follow:
            self.models.poll()  # nothing to score with yet: the champion is needed now
        if self.models._live is None:
            raise ScoringError("no usable model: model.dir and model.follow gave nothing that verifies")
        self._thread(self._score_loop, "score")
        self._thread(self._report_loop, "status-log")
        if self.config.model.follow:
            self._thread(self._follow_loop, "model-follow")
        if self.syncer is not None:
            self.syncer.start()
        if self.config.http.enabled:
            self.http = EdgeHttpServer(self, self.config.http)
            self.http.start()
        for source_config in self.config.sources:
            source = make_source(self, source_config)
            source.start()
            self.sources.append(source)
        log.info(
            "agent started",
            extra={"agent_id": self.config.agent_id, "model_version": self.models.live.version},
        )

    def stop(self) -> None:
        """Stop taking input, finish the queue, stop sync; the outbox is durable whatever happens."""
        for source in self.sources:
            source.stop()
        if self.http is not None:
            self.http.stop()
        deadline = time.monotonic() + 30
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.syncer is not None:
            self.syncer.stop()
        self.outbox.close()

    def wait(self) -> None:
        self._stop.wait()


def run(config: EdgeConfig) -> int:
    """``python -m edge run``: start, serve until SIGTERM/SIGINT, stop cleanly."""
    configure_logging(config.log_level)
    agent = Agent(config)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"signal": signum})
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    while not stopping.wait(0.5):
        pass
    agent.stop()
    return 0
