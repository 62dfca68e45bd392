"""The outbox: durable before acknowledged, orphans cleaned at start, the disk-cap policy, disk full."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from edge.outbox import PLACEHOLDER_PNG, ROW_RESERVE, SYNCED, Outbox, OutboxFull
from serving.storage import ResultRecord

KB = 1024


def record(i: int, anomalous: bool) -> ResultRecord:
    return ResultRecord(
        camera_id="cam-o",
        request_id=f"req-{i:04d}",
        captured_at=f"2026-01-01T00:00:{i % 60:02d}.000Z",
        score=0.9 if anomalous else 0.1,
        is_anomalous=anomalous,
        threshold=0.5,
        model_name="padim",
        model_version="0",
        fingerprint=f"fp-{i}",
        extra={"regions": []},
    )


def test_results_survive_reopen_and_orphan_files_are_removed(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, max_bytes=10**9)
    entry, replayed = outbox.add(record(1, True), b"overlay", b"mask", source="folder")
    assert not replayed
    again, replayed = outbox.add(record(1, True), b"other", b"other", source="folder")
    assert replayed and again.seq == entry.seq, "the same key is stored once"
    outbox.close()
    # What a kill -9 between writing the files and committing the row leaves behind:
    (tmp_path / "files" / "cam-o" / "req-0002.overlay.png").write_bytes(b"orphan")
    (tmp_path / "files" / "cam-o" / ".req-0003.mask.png.tmp-1-2").write_bytes(b"half")
    reopened = Outbox(tmp_path, max_bytes=10**9)
    try:
        assert reopened.stats()["orphan_files_removed"] == 2
        assert sorted(p.name for p in (tmp_path / "files" / "cam-o").iterdir()) == [
            "req-0001.mask.png",
            "req-0001.overlay.png",
        ]
        stored = reopened.get("cam-o", "req-0001")
        assert stored is not None and reopened.read_files(stored) == (b"overlay", b"mask")
        assert stored.record == record(1, True)
    finally:
        reopened.close()


def test_disk_cap_evicts_synced_then_normal_overlays_and_never_drops_a_verdict(tmp_path: Path) -> None:
    overlay, mask = os.urandom(100 * KB), os.urandom(1 * KB)
    outbox = Outbox(tmp_path, max_bytes=3 * 1024 * KB)
    try:
        for i in range(6):  # anomalous, pending
            outbox.add(record(i, True), overlay, mask, source="folder")
        for i in range(6, 40):  # normal, pending: their overlays go once the cap is reached
            outbox.add(record(i, False), overlay, mask, source="folder")
        stats = outbox.stats()
        assert stats["results"] == 40, "every verdict is kept"
        assert stats["evicted_normal_overlays"] > 0
        assert stats["bytes"] <= 3 * 1024 * KB + ROW_RESERVE
        for i in range(6):
            assert outbox.get("cam-o", f"req-{i:04d}").overlay_file is not None, "anomalous overlays stay"
        evicted = outbox.get("cam-o", "req-0006")
        assert evicted.overlay_evicted and outbox.read_files(evicted)[0] == PLACEHOLDER_PNG
        assert outbox.read_files(evicted)[1] == mask, "the mask of an evicted overlay stays"

        # Only anomalous overlays and masks left to drop: refuse (backpressure), do not drop.
        with pytest.raises(OutboxFull):
            for i in range(40, 80):
                outbox.add(record(i, True), overlay, mask, source="folder")
        assert outbox.stats()["refused_full"] == 1
        results_before = outbox.stats()["results"]

        # Once results are in the cloud their files are the first to go.
        for entry in outbox.pending(3):
            outbox.mark(entry.seq, SYNCED, "s3://b/k")
        outbox.add(record(100, True), overlay, mask, source="folder")
        assert outbox.stats()["evicted_synced_files"] >= 1
        assert outbox.stats()["results"] == results_before + 1
    finally:
        outbox.close()


def test_disk_full_refuses_without_leaving_partial_files(tmp_path: Path, monkeypatch) -> None:
    outbox = Outbox(tmp_path, max_bytes=10**9)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and ".mask.png" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    try:
        with pytest.raises(OutboxFull, match="disk full"):
            outbox.add(record(1, False), b"overlay", b"mask", source="folder")
        monkeypatch.undo()
        assert outbox.get("cam-o", "req-0001") is None
        assert not any((tmp_path / "files").rglob("*.png")), "no file without its row"
        assert outbox.stats()["refused_disk_full"] == 1
        outbox.add(record(1, False), b"overlay", b"mask", source="folder")  # space is back
    finally:
        outbox.close()
