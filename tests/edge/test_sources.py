"""Sources: hot folder (temp files, rejected files, a 10,000-file flood), video stream (ends, comes back)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.edge.conftest import drop_file, tiny_png, wait_for


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_hot_folder_never_reads_temporary_files_and_rejects_undecodable_ones(
    make_config, agent_factory, tmp_path
):
    folder = tmp_path / "in"
    folder.mkdir()
    temporary = [".hidden.png", "frame.png.tmp", "frame.png.part", "frame.jpg~", "notes.txt"]
    for name in temporary:
        (folder / name).write_bytes(b"\x89PNG half-written")
    agent = agent_factory(
        make_config(sources=[{"type": "folder", "camera_id": "cam-h", "path": str(folder), "poll_s": 0.02}])
    )
    drop_file(folder, "good.png", tiny_png(1))
    drop_file(folder, "broken.png", b"\x89PNG\r\n\x1a\n not really")
    wait_for(
        lambda: agent.outbox.stats()["results"] == 1 and not (folder / "broken.png").exists(), 20, "scoring"
    )
    time.sleep(0.3)
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(temporary)
    assert (folder / ".rejected" / "broken.png").is_file()
    assert agent.metrics.value("vi_edge_rejected_inputs_total") == 1
    assert agent.outbox.stats()["results"] == 1


def test_flooded_hot_folder_is_backpressured_with_bounded_memory(make_config, agent_factory, tmp_path):
    folder = tmp_path / "flood"
    folder.mkdir()
    variants = [tiny_png(i) for i in range(50)]
    for i in range(10_000):
        (folder / f"f{i:05d}.png").write_bytes(variants[i % 50])  # written before the agent starts
    config = make_config(
        sources=[{"type": "folder", "camera_id": "cam-f", "path": str(folder), "poll_s": 0.02}],
        queue={"max_depth": 4},
    )
    rss_before = _rss_mb()
    agent = agent_factory(config)
    source = agent.sources[0]
    peak_queue = peak_in_flight = peak_names = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        peak_queue = max(peak_queue, agent.queue.qsize())
        peak_in_flight = max(peak_in_flight, source.status()["in_flight"])
        peak_names = max(peak_names, len(source._names))
        time.sleep(0.01)
    rss_growth = _rss_mb() - rss_before
    for s in agent.sources:
        s.stop()
    agent.queue.join()
    processed = agent.outbox.stats()["results"]
    remaining = len(list(folder.glob("*.png")))
    print(f"flood: {processed} processed in 15 s, {remaining} left in place, RSS +{rss_growth:.0f} MB")
    assert processed > 100
    assert processed + remaining == 10_000, "every file is either processed (once) or still waiting"
    assert peak_queue <= 4 and peak_in_flight <= 5 and peak_names <= 256
    assert agent.metrics.value("vi_edge_backpressure_total") == 0, "the folder waits instead of being refused"
    assert rss_growth < 80, f"memory grew {rss_growth:.0f} MB"


def _video(path: Path, frames: int) -> Path:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def test_video_stream_drops_oldest_when_behind_and_reconnects_when_it_ends_or_vanishes(
    make_config, agent_factory, tmp_path
):
    video = _video(tmp_path / "camera.avi", 40)
    config = make_config(
        sources=[
            {"type": "stream", "camera_id": "cam-v", "url": str(video), "buffer": 2, "reconnect_s": 0.3}
        ],
        queue={"max_depth": 2},
    )
    agent = agent_factory(config)
    metrics = agent.metrics
    wait_for(lambda: metrics.value("vi_edge_stream_disconnects_total") >= 1, 30, "the video to end")
    wait_for(lambda: metrics.value("vi_edge_stream_connects_total") >= 2, 30, "a reconnect")
    assert metrics.value("vi_edge_frames_dropped_total") > 0, "scoring is slower than reading a file"

    hidden = video.rename(tmp_path / "away.avi")  # the camera disappears
    wait_for(lambda: metrics.value("vi_edge_stream_connect_failures_total") >= 1, 30, "a failed reconnect")
    scored_while_away = agent.outbox.stats()["results"]
    connects = metrics.value("vi_edge_stream_connects_total")
    hidden.rename(video)  # and comes back
    wait_for(lambda: metrics.value("vi_edge_stream_connects_total") > connects, 30, "the camera to come back")
    wait_for(
        lambda: agent.outbox.stats()["results"] > scored_while_away, 30, "frames scored after it came back"
    )
    read = agent.sources[0].frames_read
    stats = agent.outbox.stats()
    dropped = metrics.value("vi_edge_frames_dropped_total")
    assert stats["results"] + dropped <= read, "a frame is scored or counted as dropped, never both"
    assert agent.status()["sources"][0]["type"] == "stream"
