"""The durable outbox: every result, with its overlay and mask, is on local disk before it is acknowledged.

Why: the line must not stop when the cloud is unreachable, and no verdict may be lost. A result is
"acknowledged" (HTTP 200, hot-folder file removed, frame counted as scored) only after
:meth:`Outbox.add` returns, and that happens only after

1. the overlay and mask files are written to a temp name, fsynced, renamed into place and the
   folder fsynced (:func:`write_durable`), then
2. the row (the verdict and the whole :class:`serving.storage.ResultRecord`) is committed to SQLite
   in WAL mode with ``synchronous=FULL``.

A kill -9 between 1 and 2 leaves files no row names: :meth:`Outbox.recover` deletes them at start.
A row never names a file that is not complete (files first, row second; eviction commits the row
change before unlinking). The row's key is the cloud's key, ``(camera_id, request_id)``, so a
source that re-submits the same input after a crash finds its result instead of storing a second one.

**Disk cap** (``outbox.max_bytes``: files + database + WAL, held to within ``ROW_RESERVE`` - the
database pages a commit or a counter update may add after the check). When a new result would
exceed it, space is freed in this order, oldest first, each counted in :meth:`Outbox.stats`:

1. overlay + mask files of results already in the cloud (normal images before anomalous ones);
2. overlays of *normal* images not yet synced (the verdict, score, regions and mask stay; the
   cloud item is marked ``overlay_evicted: true`` and its overlay object is a 1x1 placeholder).

Verdicts are never dropped. If that is still not enough the result is refused with
:class:`OutboxFull` and the source applies backpressure (the hot-folder file stays, the HTTP
caller gets 507 with Retry-After, the stream frame is dropped and counted). The same happens when
the disk itself is full (ENOSPC).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.crash import crash_point
from serving.storage import ResultRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    camera_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    captured_at TEXT NOT NULL,
    is_anomalous INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    source TEXT NOT NULL,
    record TEXT NOT NULL,
    overlay_file TEXT,
    mask_file TEXT,
    overlay_evicted INTEGER NOT NULL DEFAULT 0,
    file_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    sync_state TEXT NOT NULL DEFAULT 'pending',
    synced_at REAL,
    cloud_uri TEXT,
    UNIQUE (camera_id, request_id)
);
CREATE INDEX IF NOT EXISTS results_sync ON results (sync_state, seq);
CREATE INDEX IF NOT EXISTS results_time ON results (camera_id, captured_at, request_id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
PENDING, SYNCED, CONFLICT = "pending", "synced", "conflict"
ROW_RESERVE = 16 * 1024
_COLUMNS = (
    "seq, camera_id, request_id, captured_at, is_anomalous, fingerprint, source, record, overlay_file, "
    "mask_file, overlay_evicted, file_bytes, created_at, sync_state, synced_at, cloud_uri"
)
# A 1x1 black PNG: what the cloud gets for an overlay evicted under the disk cap.
PLACEHOLDER_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="
)


class OutboxFull(RuntimeError):
    """The result cannot be kept within the cap (or the disk is full): apply backpressure."""


@dataclass(frozen=True)
class Entry:
    """One stored result: the record that goes to the cloud plus where its files are."""

    seq: int
    camera_id: str
    request_id: str
    captured_at: str
    is_anomalous: bool
    fingerprint: str
    source: str
    record: ResultRecord
    overlay_file: str | None
    mask_file: str | None
    overlay_evicted: bool
    file_bytes: int
    created_at: float
    sync_state: str
    synced_at: float | None
    cloud_uri: str | None

    def item(self, local_uri: str) -> dict[str, Any]:
        """The result as the cloud item would show it (the shape the GET routes answer from)."""
        r = self.record
        return {
            **r.extra,
            "camera_id": r.camera_id,
            "request_id": r.request_id,
            "captured_at": r.captured_at,
            "score": r.score,
            "is_anomalous": r.is_anomalous,
            "threshold": r.threshold,
            "model_name": r.model_name,
            "model_version": r.model_version,
            "image_width": r.image_width,
            "image_height": r.image_height,
            "fingerprint": r.fingerprint,
            "result_uri": self.cloud_uri or local_uri,
            "sync_state": self.sync_state,
        }


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """temp file → fsync → rename → fsync the folder: ``path`` holds all of ``data`` or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Outbox:
    """SQLite (WAL) + a files folder under ``root``; safe to share between threads."""

    def __init__(self, root: Path, *, max_bytes: int, keep_synced: int = 100_000, fsync: bool = True) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.keep_synced = keep_synced
        self.fsync = fsync
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "outbox.sqlite3", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # The WAL counts against the cap: keep it to ~1 MB between checkpoints.
        self._db.execute("PRAGMA wal_autocheckpoint=256")
        self._db.execute("PRAGMA journal_size_limit=1048576")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.executescript(SCHEMA)
        self._file_bytes = self._db.execute("SELECT COALESCE(SUM(file_bytes), 0) FROM results").fetchone()[0]
        self.recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Delete temp files and files no row names (left by a kill between file write and commit)."""
        with self._lock:
            referenced = set()
            for overlay, mask in self._db.execute("SELECT overlay_file, mask_file FROM results"):
                referenced.update(f for f in (overlay, mask) if f)
            removed = 0
            for path in self.files.rglob("*"):
                if path.is_file() and str(path.relative_to(self.files)) not in referenced:
                    path.unlink(missing_ok=True)
                    removed += 1
            if removed:
                self._count("orphan_files_removed", removed)
            return removed

    # -- writes -----------------------------------------------------------------------------
    def get(self, camera_id: str, request_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM results WHERE camera_id = ? AND request_id = ?",
                (camera_id, request_id),
            ).fetchone()
        return self._entry(row) if row else None

    def add(
        self, record: ResultRecord, overlay_png: bytes, mask_png: bytes, *, source: str
    ) -> tuple[Entry, bool]:
        """Store durably; ``(entry, replayed)``: replayed when this key was already stored (kept as is)."""
        with self._lock:
            existing = self.get(record.camera_id, record.request_id)
            if existing is not None:
                return existing, True
            needed = len(overlay_png) + len(mask_png)
            self._make_room(needed)
            folder = self.files / record.camera_id
            names = (
                f"{record.camera_id}/{record.request_id}.overlay.png",
                f"{record.camera_id}/{record.request_id}.mask.png",
            )
            try:
                if not folder.is_dir():
                    folder.mkdir(parents=True, exist_ok=True)
                    if self.fsync:
                        fsync_dir(self.files)
                write_durable(self.files / names[0], overlay_png, fsync=self.fsync)
                write_durable(self.files / names[1], mask_png, fsync=self.fsync)
            except OSError as exc:
                for name in names:
                    (self.files / name).unlink(missing_ok=True)
                if _is_disk_full(exc):
                    self._count("refused_disk_full")
                    raise OutboxFull(f"disk full writing the outbox ({exc.strerror})") from exc
                raise
            crash_point("after_files")
            try:
                self._db.execute(
                    "INSERT INTO results (camera_id, request_id, captured_at, is_anomalous, fingerprint,"
                    " source, record, overlay_file, mask_file, file_bytes, created_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record.camera_id,
                        record.request_id,
                        record.captured_at,
                        int(record.is_anomalous),
                        record.fingerprint,
                        source,
                        json.dumps(dataclasses.asdict(record), separators=(",", ":")),
                        names[0],
                        names[1],
                        needed,
                        time.time(),
                    ),
                )
            except sqlite3.OperationalError as exc:
                for name in names:
                    (self.files / name).unlink(missing_ok=True)
                if "full" in str(exc).lower():
                    self._count("refused_disk_full")
                    raise OutboxFull(f"disk full writing the outbox database ({exc})") from exc
                raise
            self._file_bytes += needed
            entry = self.get(record.camera_id, record.request_id)
            assert entry is not None
            return entry, False

    def _used(self) -> int:
        db = sum(p.stat().st_size for p in self.root.glob("outbox.sqlite3*") if p.is_file())
        return self._file_bytes + db

    def _make_room(self, needed: int) -> None:
        """Evict by the policy in the module docstring until ``needed`` fits, else :class:`OutboxFull`.

        ``ROW_RESERVE`` is what the row's commit may add to the database and its WAL (a few pages),
        so the cap holds after the commit too. Usage is measured after each eviction, so what the
        eviction's own updates add to the WAL is paid for as well.
        """
        over = self._used() + needed + ROW_RESERVE - self.max_bytes
        if over <= 0:
            return
        # The WAL counts against the cap and only shrinks at a checkpoint: fold it in before evicting
        # anything (a full outbox that keeps refusing would otherwise grow it by a frame per refusal).
        self.checkpoint()
        over = self._used() + needed + ROW_RESERVE - self.max_bytes
        if over <= 0:
            return
        steps = (
            ("evicted_synced_files", "sync_state != 'pending' AND file_bytes > 0 ORDER BY is_anomalous, seq"),
            ("evicted_normal_overlays",
             "sync_state = 'pending' AND is_anomalous = 0 AND overlay_file IS NOT NULL ORDER BY seq"),
        )  # fmt: skip
        for counter, where in steps:
            while over > 0:
                rows = self._db.execute(
                    f"SELECT seq, overlay_file, mask_file FROM results WHERE {where} LIMIT 64"
                ).fetchall()
                if not rows:
                    break
                for seq, overlay, mask in rows:
                    synced_step = counter == "evicted_synced_files"
                    files = [f for f in ((overlay, mask) if synced_step else (overlay,)) if f]
                    freed = sum(self._size(f) for f in files)
                    if synced_step:
                        self._db.execute(
                            "UPDATE results SET overlay_file = NULL, mask_file = NULL, file_bytes = 0"
                            " WHERE seq = ?",
                            (seq,),
                        )
                    else:
                        self._db.execute(
                            "UPDATE results SET overlay_file = NULL, overlay_evicted = 1,"
                            " file_bytes = MAX(0, file_bytes - ?) WHERE seq = ?",
                            (freed, seq),
                        )
                    for f in files:  # after the commit: a row never names a missing file
                        (self.files / f).unlink(missing_ok=True)
                    self._file_bytes -= freed
                    self._count(counter)
                    # Measured again, not ``over -= freed``: the eviction's own updates grow the
                    # database and its WAL, and that growth counts against the cap too.
                    over = self._used() + needed + ROW_RESERVE - self.max_bytes
                    if over <= 0:
                        return
        if over > 0:
            self._count("refused_full")
            self.checkpoint()  # the count's own WAL frame
            raise OutboxFull(
                f"outbox cap {self.max_bytes} bytes reached with only verdicts left to drop; "
                "refusing new results until the cloud sync frees space"
            )

    def _size(self, name: str) -> int:
        try:
            return (self.files / name).stat().st_size
        except FileNotFoundError:
            return 0

    # -- sync side --------------------------------------------------------------------------
    def pending(self, limit: int) -> list[Entry]:
        """The oldest results not yet in the cloud, in commit order."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM results WHERE sync_state = 'pending' ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [self._entry(r) for r in rows]

    def read_files(self, entry: Entry) -> tuple[bytes, bytes]:
        """Overlay and mask bytes (the placeholder for an evicted overlay)."""
        overlay = (self.files / entry.overlay_file).read_bytes() if entry.overlay_file else PLACEHOLDER_PNG
        mask = (self.files / entry.mask_file).read_bytes() if entry.mask_file else PLACEHOLDER_PNG
        return overlay, mask

    def read_mask(self, entry: Entry) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return (self.files / entry.mask_file).read_bytes() if entry.mask_file else None
        return None

    def mark(self, seq: int, state: str, cloud_uri: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE results SET sync_state = ?, synced_at = ?, cloud_uri = ? WHERE seq = ?",
                (state, time.time(), cloud_uri, seq),
            )
            if state == SYNCED:
                self._prune()

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it.

        Why: the WAL counts against the disk cap, and the sync's updates (marking results synced)
        grow it after the last cap check; a checkpoint after each sync pass gives that space back, so
        the cap holds at rest and not only at the moment a result is added.
        """
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _prune(self) -> None:
        """Keep at most ``keep_synced`` synced rows (oldest go, with their files)."""
        extra = self._db.execute("SELECT COUNT(*) FROM results WHERE sync_state = 'synced'").fetchone()[0]
        extra -= self.keep_synced
        if extra <= 0:
            return
        rows = self._db.execute(
            "SELECT seq, overlay_file, mask_file, file_bytes FROM results WHERE sync_state = 'synced'"
            " ORDER BY seq LIMIT ?",
            (extra,),
        ).fetchall()
        for seq, overlay, mask, size in rows:
            self._db.execute("DELETE FROM results WHERE seq = ?", (seq,))
            for f in (overlay, mask):
                if f:
                    (self.files / f).unlink(missing_ok=True)
            self._file_bytes -= size
        self._count("pruned_synced_rows", len(rows))

    # -- reads ------------------------------------------------------------------------------
    def query(
        self, camera_id: str, *, since: str | None, until: str | None, limit: int, next_token: str | None
    ) -> tuple[list[Entry], str | None]:
        """One page of a camera's results by ``captured_at`` (oldest first), like the cloud's GET."""
        sql = f"SELECT {_COLUMNS} FROM results WHERE camera_id = ?"
        args: list[Any] = [camera_id]
        if since:
            sql += " AND captured_at >= ?"
            args.append(since)
        if until:
            sql += " AND captured_at <= ?"
            args.append(until)
        if next_token:
            try:
                after = json.loads(base64.urlsafe_b64decode(next_token + "=" * (-len(next_token) % 4)))
                sql += " AND (captured_at, request_id) > (?, ?)"
                args += [str(after[0]), str(after[1])]
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                raise ValueError("next_token is not a token this API issued") from exc
        sql += " ORDER BY captured_at, request_id LIMIT ?"
        args.append(limit + 1)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        entries = [self._entry(r) for r in rows[:limit]]
        token = None
        if len(rows) > limit:
            last = entries[-1]
            token = base64.urlsafe_b64encode(json.dumps([last.captured_at, last.request_id]).encode())
            token = token.decode().rstrip("=")
        return entries, token

    def stats(self) -> dict[str, int]:
        """Sizes and counts for /status and /metrics."""
        with self._lock:
            counts = dict(
                self._db.execute("SELECT sync_state, COUNT(*) FROM results GROUP BY sync_state").fetchall()
            )
            anomalous = self._db.execute("SELECT COUNT(*) FROM results WHERE is_anomalous = 1").fetchone()[0]
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            used = self._used()
        return {
            "results": sum(counts.values()),
            "pending": counts.get(PENDING, 0),
            "synced": counts.get(SYNCED, 0),
            "conflicts": counts.get(CONFLICT, 0),
            "anomalous": anomalous,
            "bytes": used,
            "max_bytes": self.max_bytes,
            **counters,
        }

    def _count(self, name: str, amount: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, amount, amount),
        )

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> Entry:
        record = ResultRecord(**json.loads(row[7]))
        return Entry(
            seq=row[0],
            camera_id=row[1],
            request_id=row[2],
            captured_at=row[3],
            is_anomalous=bool(row[4]),
            fingerprint=row[5],
            source=row[6],
            record=record,
            overlay_file=row[8],
            mask_file=row[9],
            overlay_evicted=bool(row[10]),
            file_bytes=row[11],
            created_at=row[12],
            sync_state=row[13],
            synced_at=row[14],
            cloud_uri=row[15],
        )
