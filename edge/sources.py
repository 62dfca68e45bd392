"""Where images come from: a hot folder and an OpenCV stream, each with a camera id and a stated policy.

**Hot folder** (``type: folder``). Writers must create a file under a temporary name and rename it
into the folder (atomic on one file system). Names starting with ``.`` or ending in ``.tmp``,
``.part``, ``.partial``, ``.crdownload`` or ``~`` and non-image suffixes are never opened, so a
half-written file is never read. Files are taken oldest name first; a file is removed (or moved
to ``done_dir``) only after its result is durable in the outbox, so a kill -9 at any moment loses
nothing - the restarted agent finds the same file, derives the same ``request_id`` (from camera,
name and content) and the outbox replays the stored result instead of storing a second one.
*When scoring falls behind* files are simply left where they are (backpressure): at most
``queue.max_depth`` files are in flight and at most 256 names are held, whatever the folder holds.
Undecodable files go to ``rejected_dir`` (default ``<path>/.rejected``).

**Stream** (``type: stream``): a USB camera index (``"0"``), an RTSP/HTTP URL or a video file,
read with OpenCV. At most ``fps`` frames per second are taken (0: every frame); each is encoded
as PNG (lossless, so the result equals the Lambda's for the same PNG) and waits in a buffer of
``buffer`` frames. *When scoring falls behind* the oldest buffered frame is dropped and counted
(``vi_edge_frames_dropped_total``): a live line wants the newest picture. When the stream ends or
breaks the source reconnects every ``reconnect_s`` and counts it.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge.config import IMAGE_SUFFIXES, SourceConfig
from edge.crash import crash_point
from edge.jobs import Job, make_request
from edge.outbox import OutboxFull
from serving.events import RequestError, utc_now

log = logging.getLogger("edge.sources")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~")
NAME_BUFFER = 256


def is_candidate(name: str) -> bool:
    """Whether a hot-folder file name may be read (complete image, not a temp or hidden file)."""
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(TEMP_SUFFIXES) and lower.endswith(IMAGE_SUFFIXES)


def folder_request_id(agent_id: str, camera_id: str, name: str, sha256: str) -> str:
    """Stable across restarts: the same file (name + content) always gets the same id."""
    digest = hashlib.sha256(f"{agent_id}\n{camera_id}\n{name}\n{sha256}".encode()).hexdigest()
    return f"edge-f-{digest[:40]}"


class _ThreadSource:
    """A source that runs its loop (``_run``) on its own daemon thread until :meth:`stop`."""

    kind: str
    config: SourceConfig
    _stop: threading.Event
    _thread: threading.Thread | None

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"{self.kind}-{self.config.camera_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


class FolderSource(_ThreadSource):
    """A hot folder (see the module docstring)."""

    kind = "folder"

    def __init__(self, agent: Any, config: SourceConfig) -> None:
        assert config.path is not None
        self.agent, self.config, self.path = agent, config, config.path
        self.path.mkdir(parents=True, exist_ok=True)
        self.rejected_dir = config.rejected_dir or self.path / ".rejected"
        self._in_flight: set[str] = set()
        self._names: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause_until = 0.0
        self._thread: threading.Thread | None = None
        self.labels = {"camera_id": config.camera_id, "source": "folder"}

    def status(self) -> dict[str, Any]:
        with self._lock:
            in_flight = len(self._in_flight)
        return {
            "type": "folder",
            "camera_id": self.config.camera_id,
            "path": str(self.path),
            "in_flight": in_flight,
        }

    def _refill(self) -> None:
        """The next names in order, at most NAME_BUFFER of them (memory stays bounded)."""
        with self._lock:
            busy = set(self._in_flight)
        try:
            with os.scandir(self.path) as it:
                names = (e.name for e in it if is_candidate(e.name) and e.name not in busy and e.is_file())
                self._names = heapq.nsmallest(NAME_BUFFER, names)
        except FileNotFoundError:
            self._names = []
        self._names.reverse()  # pop() from the end = smallest first

    def _run(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() < self._pause_until or self.agent.queue_free() <= 0:
                self._stop.wait(self.config.poll_s)
                continue
            if not self._names:
                self._refill()
                if not self._names:
                    self._stop.wait(self.config.poll_s)
                    continue
            while self._names and self.agent.queue_free() > 0 and not self._stop.is_set():
                name = self._names.pop()
                with self._lock:
                    if name in self._in_flight:
                        continue
                self._take(name)

    def _take(self, name: str) -> None:

        path = self.path / name
        try:
            data = path.read_bytes()
            stat = path.stat()
        except FileNotFoundError:
            return  # removed by someone else
        sha = hashlib.sha256(data).hexdigest()
        captured = (
            datetime.fromtimestamp(stat.st_mtime, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        try:
            request = make_request(
                self.config.camera_id,
                data,
                request_id=folder_request_id(self.agent.config.agent_id, self.config.camera_id, name, sha),
                captured_at=captured,
                limits=self.agent.limits,
            )
        except RequestError as exc:
            self._reject(path, exc.message)
            return
        with self._lock:
            self._in_flight.add(name)
        job = Job(request=request, source="folder", done=lambda result, n=name: self._done(n, result))
        if not self.agent.try_submit(job):
            with self._lock:
                self._in_flight.discard(name)

    def _done(self, name: str, result: Any) -> None:
        path = self.path / name
        try:
            if result.entry is not None:
                crash_point("after_commit")
                if self.config.done == "move" and self.config.done_dir is not None:
                    self.config.done_dir.mkdir(parents=True, exist_ok=True)
                    os.replace(path, self.config.done_dir / name)
                else:
                    path.unlink(missing_ok=True)
            elif isinstance(result.error, OutboxFull):
                self._pause_until = time.monotonic() + max(1.0, self.config.poll_s)  # backpressure
            else:
                # The model failed: leave the file for a later try (or a rolled-back model).
                self._pause_until = time.monotonic() + max(1.0, self.config.poll_s * 5)
        except FileNotFoundError:
            pass
        finally:
            with self._lock:
                self._in_flight.discard(name)

    def _reject(self, path: Path, reason: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(str(path), self.rejected_dir / path.name)
        except FileNotFoundError:
            return
        self.agent.metrics.inc("vi_edge_rejected_inputs_total", labels=self.labels)
        log.warning("input rejected", extra={**self.labels, "file": path.name, "reason": reason})


class StreamSource(_ThreadSource):
    """An OpenCV capture (see the module docstring)."""

    kind = "stream"

    def __init__(self, agent: Any, config: SourceConfig) -> None:
        self.agent, self.config = agent, config
        self._buffer: deque[tuple[bytes, str]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.labels = {"camera_id": config.camera_id, "source": "stream"}
        self.connected = False
        self.frames_read = 0

    def status(self) -> dict[str, Any]:
        return {
            "type": "stream",
            "camera_id": self.config.camera_id,
            "connected": self.connected,
            "frames_read": self.frames_read,
            "buffered": len(self._buffer),
        }

    def _open(self) -> Any:
        import cv2

        url = str(self.config.url)
        capture = cv2.VideoCapture(int(url) if url.isdigit() else url)
        if not capture.isOpened():
            capture.release()
            return None
        return capture

    def _run(self) -> None:
        import cv2

        interval = 1.0 / self.config.fps if self.config.fps else 0.0
        while not self._stop.is_set():
            capture = self._open()
            if capture is None:
                self.agent.metrics.inc("vi_edge_stream_connect_failures_total", labels=self.labels)
                self._stop.wait(self.config.reconnect_s)
                continue
            self.connected = True
            self.agent.metrics.inc("vi_edge_stream_connects_total", labels=self.labels)
            last = 0.0
            try:
                while not self._stop.is_set():
                    self._flush()
                    if not capture.grab():
                        break
                    now = time.monotonic()
                    if interval and now - last < interval:
                        continue
                    ok, frame = capture.retrieve()
                    if not ok or frame is None:
                        break
                    last = now
                    self.frames_read += 1
                    encoded, png = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                    if not encoded:
                        continue
                    if len(self._buffer) >= self.config.buffer:
                        self._buffer.popleft()
                        self.agent.metrics.inc("vi_edge_frames_dropped_total", labels=self.labels)
                    self._buffer.append((png.tobytes(), utc_now()))
                    self._flush()
            finally:
                capture.release()
                self.connected = False
            self.agent.metrics.inc("vi_edge_stream_disconnects_total", labels=self.labels)
            log.warning(
                "stream ended or broke; reconnecting",
                extra={**self.labels, "reconnect_s": self.config.reconnect_s},
            )
            # Frames still buffered are scored as the queue frees up while we wait to reconnect.
            deadline = time.monotonic() + self.config.reconnect_s
            while time.monotonic() < deadline and not self._stop.is_set():
                self._flush()
                self._stop.wait(0.05)

    def _flush(self) -> None:

        while self._buffer and self.agent.queue_free() > 0:
            data, captured_at = self._buffer.popleft()
            try:
                request = make_request(
                    self.config.camera_id,
                    data,
                    request_id=f"edge-s-{uuid.uuid4().hex}",
                    captured_at=captured_at,
                    limits=self.agent.limits,
                )
            except RequestError as exc:
                self.agent.metrics.inc("vi_edge_rejected_inputs_total", labels=self.labels)
                log.warning("frame rejected", extra={**self.labels, "reason": exc.message})
                continue
            if not self.agent.try_submit(Job(request=request, source="stream", done=self._done)):
                self._buffer.appendleft((data, captured_at))
                return

    def _done(self, result: Any) -> None:
        if result.entry is None:  # outbox full or model failure: a live frame cannot wait
            self.agent.metrics.inc("vi_edge_frames_dropped_total", labels=self.labels)


def make_source(agent: Any, config: SourceConfig) -> FolderSource | StreamSource:
    return FolderSource(agent, config) if config.type == "folder" else StreamSource(agent, config)
