"""kill -9 of the agent at many moments (during scoring, outbox writes, sync): nothing lost or stored twice.

Each life of the agent is a real process killed with SIGKILL: either from outside after a random
time, or from inside at a named point (:mod:`edge.crash`) - files written but no row, row committed
but the input not yet removed, item stored in the cloud but not marked synced - which random outside
kills would rarely hit. Meanwhile a camera posts through the HTTP API and retries each image with
its idempotency key until it gets 200. Lives are forked from a preloaded launcher
(``tests/edge/launcher.py``), so a life costs tens of milliseconds of start-up, not seconds of imports.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from edge.outbox import Outbox
from edge.sources import folder_request_id
from tests.edge.conftest import BUCKET, TABLE, drop_file, tiny_png
from tests.edge.test_sync import check_cloud_equals_local

IMAGES = 200
HTTP_IMAGES = 40
MIN_KILLS = 50
MAX_SECONDS = 100


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http_camera(port: int, keys: list[str], stop: threading.Event, answers: dict[str, dict]) -> None:
    """A camera posting through the agent's HTTP API, retrying each image with its key until 200."""
    for i, key in enumerate(keys):
        data = tiny_png(40_000 + i)
        while not stop.is_set():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/cameras/cam-h/images",
                data=data,
                headers={"content-type": "image/png", "idempotency-key": key},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answers[key] = json.loads(response.read())
                    break
            except (OSError, http.client.HTTPException):  # refused, reset, 429/503/507, killed mid-answer
                time.sleep(0.05)


def _write_config(path: Path, state: Path, folder: Path, champion: Path, endpoint: str, port: int) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "agent_id": "kill-agent",
                "state_dir": str(state),
                "model": {"dir": str(champion)},
                "sources": [{"type": "folder", "camera_id": "cam-k", "path": str(folder), "poll_s": 0.02}],
                "http": {"host": "127.0.0.1", "port": port},
                "queue": {"max_depth": 4},
                "cloud": {
                    "table": TABLE,
                    "bucket": BUCKET,
                    "endpoint_url": endpoint,
                    "batch_size": 5,
                    "interval_s": 0.02,
                    "backoff_initial_s": 0.02,
                    "backoff_max_s": 0.1,
                },
                "log_level": "ERROR",
            }
        )
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _pending(state: Path) -> int:
    import sqlite3

    db = state / "outbox" / "outbox.sqlite3"
    if not db.exists():
        return -1
    with sqlite3.connect(db, timeout=5) as conn:
        return conn.execute("SELECT COUNT(*) FROM results WHERE sync_state = 'pending'").fetchone()[0]


def test_kill_9_at_random_moments_loses_nothing_and_stores_nothing_twice(
    cloud, champion_dir: Path, serving_model_dir: Path, tmp_path: Path
) -> None:
    folder, state, config = tmp_path / "in", tmp_path / "state", tmp_path / "edge.yaml"
    folder.mkdir()
    port = _free_port()
    _write_config(config, state, folder, champion_dir, cloud["endpoint_url"], port)
    expected = set()
    for i in range(IMAGES):
        data = tiny_png(20_000 + i)
        name = f"k{i:04d}.png"
        drop_file(folder, name, data)
        expected.add(folder_request_id("kill-agent", "cam-k", name, hashlib.sha256(data).hexdigest()))

    env = {**os.environ, "VI_EDGE_CRASH_POINTS": "after_files:0.03,after_commit:0.03,after_put:0.03"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tests.edge.launcher"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "agent.log").open("wb"),
        text=True,
        env=env,
    )

    def ask(line: str) -> str:
        assert launcher.stdin is not None and launcher.stdout is not None
        launcher.stdin.write(line + "\n")
        launcher.stdin.flush()
        return launcher.stdout.readline().strip()

    keys = [f"h-{i:03d}" for i in range(HTTP_IMAGES)]
    answers: dict[str, dict] = {}
    stop_camera = threading.Event()
    camera = threading.Thread(target=_http_camera, args=(port, keys, stop_camera, answers), daemon=True)
    camera.start()
    rng = random.Random(16)
    kills = self_kills = 0
    started = time.monotonic()
    try:
        while (kills < MIN_KILLS or any(folder.glob("*.png")) or camera.is_alive()) and (
            time.monotonic() - started < MAX_SECONDS
        ):
            pid = int(ask(f"start {config}"))
            answer = ask(f"wait {pid} {rng.uniform(0.1, 1.2):.3f}")
            if answer == "alive":
                os.kill(pid, signal.SIGKILL)
                answer = ask(f"reap {pid}")
            else:
                self_kills += 1
            assert answer == "-9", f"agent life ended with {answer}, not by SIGKILL (see agent.log)"
            kills += 1
        assert kills >= MIN_KILLS, f"only {kills} kills in {MAX_SECONDS} s"
        assert self_kills >= 5, "the crash points inside the agent were hardly hit"

        # A last life without crash points drains the rest, then stops cleanly on SIGTERM.
        pid = int(ask(f"start {config} nocrash"))
        deadline = time.monotonic() + 60
        while not _healthy(port) and time.monotonic() < deadline:  # signal handlers are set by then
            time.sleep(0.05)
        while (any(folder.glob("*.png")) or _pending(state) != 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        assert ask(f"reap {pid}") == "0"
    finally:
        stop_camera.set()
        camera.join(30)
        assert launcher.stdin is not None
        launcher.stdin.close()
        launcher.wait(30)

    assert not list(folder.glob("*.png")), "every input was processed"
    outbox = Outbox(state / "outbox", max_bytes=10**12)
    try:
        entries, _ = outbox.query("cam-k", since=None, until=None, limit=10_000, next_token=None)
        assert {e.request_id for e in entries} == expected, "each input has exactly one local result"
        posted, _ = outbox.query("cam-h", since=None, until=None, limit=10_000, next_token=None)
        assert sorted(answers) == keys, "every HTTP image got its 200 in the end"
        assert {e.request_id: e.record.score for e in posted} == {k: a["score"] for k, a in answers.items()}
        counts = check_cloud_equals_local(
            outbox, ["cam-k", "cam-h"], serving_model_dir, agent_id="kill-agent", version="0"
        )
        total = IMAGES + HTTP_IMAGES
        assert counts == {"local": total, "cloud": total, "objects": 2 * total}
        print(f"{kills} kills ({self_kills} at crash points) in {time.monotonic() - started:.0f} s; {counts}")
    finally:
        outbox.close()
