"""Edge agent benchmark: per-image latency, images/s, resident memory, sync throughput.

``python -m benchmarks.edge [--model-dir DIR] [--images N] [--fsync | --no-fsync]``

Why: the agent runs on a small line PC next to the camera; the issue sets a budget of <= 300 MB
resident with the model loaded. The scoring phase runs in a fresh child process (so its memory
is the agent's alone): the agent is built as ``vi-edge run`` builds it (outbox, model slots,
no sources), then N real ELPV images (300x300, cycled) go through :meth:`edge.agent.Agent.process`
- decode, score, mask, regions, overlay and the durable outbox write (fsync) - one at a time.
Printed: p50/p95 ms per image, images/s, VmRSS after the model is loaded and after the run,
VmHWM. The sync phase then pushes that outbox into the Lambda's table and bucket on a local moto
server (127.0.0.1, its own process) and prints results/s. Model: ``serving/model`` when promoted,
else the tiny PaDiM fixture (64x64). Nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from config.paths import REPO_ROOT

TABLE, BUCKET = "edge-bench-results", "edge-bench-bucket"


def _proc_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


def score_phase(model_dir: Path, state: Path, images: int, fsync: bool) -> dict[str, Any]:
    """Runs in the child: build the agent, score ``images`` images, report figures as a dict."""
    from edge.agent import Agent
    from edge.config import parse_config
    from edge.jobs import Job, make_request
    from tools.tiny_model import elpv_samples

    config = parse_config(
        {
            "agent_id": "bench",
            "state_dir": str(state),
            "model": {"dir": str(model_dir)},
            "http": {"enabled": False},
            "outbox": {"fsync": fsync},
        }
    )
    agent = Agent(config)
    agent.models.start()
    rss_loaded = _proc_kb("VmRSS") / 1024
    normal, defect = elpv_samples(4, 4)
    samples = [p.read_bytes() for p in normal + defect]
    latencies = []
    started = time.perf_counter()
    for i in range(images):
        t = time.perf_counter()
        request = make_request(
            "bench-cam",
            samples[i % len(samples)],
            request_id=f"b-{i}",
            captured_at="2026-01-01T00:00:00.000Z",
            limits=agent.limits,
        )
        result = agent.process(Job(request=request, source="folder", done=lambda r: None))
        if result.error is not None:
            raise result.error
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - started
    agent.outbox.close()
    latencies.sort()
    return {
        "images": images,
        "p50_ms": round(latencies[len(latencies) // 2], 2),
        "p95_ms": round(latencies[int(len(latencies) * 0.95) - 1], 2),
        "images_per_s": round(images / elapsed, 1),
        "rss_model_loaded_mb": round(rss_loaded, 1),
        "rss_after_mb": round(_proc_kb("VmRSS") / 1024, 1),
        "hwm_mb": round(_proc_kb("VmHWM") / 1024, 1),
        "model_input": [
            agent.models.live.scorer.metadata.input.height,
            agent.models.live.scorer.metadata.input.width,
        ],
    }


def sync_phase(state: Path) -> dict[str, Any]:
    """Start moto (own process), sync the child's outbox into it, time it."""
    from benchmarks.serving import MOTO_CHILD
    from edge.config import CloudConfig
    from edge.metrics import Metrics
    from edge.outbox import Outbox
    from edge.sync import Syncer, make_store
    from serving.storage import create_resources

    moto = subprocess.Popen(
        [sys.executable, "-c", MOTO_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert moto.stdout is not None
        endpoint = moto.stdout.readline().strip()
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
        )
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        create_resources(TABLE, BUCKET)
        cloud = CloudConfig(table=TABLE, bucket=BUCKET, endpoint_url=endpoint, batch_size=25, workers=2)
        outbox = Outbox(state / "outbox", max_bytes=10**12)
        syncer = Syncer(outbox, make_store(cloud), cloud, agent_id="bench", metrics=Metrics())
        total = outbox.stats()["pending"]
        started = time.perf_counter()
        while outbox.stats()["pending"]:
            if syncer.sync_once() == 0 and syncer.failures:
                raise RuntimeError(f"sync failed: {syncer.last_error}")
        elapsed = time.perf_counter() - started
        syncer.stop()
        outbox.close()
        return {"synced": total, "sync_results_per_s": round(total / elapsed, 1), "sync_s": round(elapsed, 1)}
    finally:
        if moto.stdin:
            moto.stdin.close()
        moto.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # state dir: run the score phase
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(score_phase(args.model_dir, args.child, args.images, args.fsync)))
        return 0
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            promoted = REPO_ROOT / "serving" / "model"
            if (promoted / "metadata.json").is_file():
                model_dir = promoted
            else:
                from tools.tiny_model import build_tiny_model

                model_dir = build_tiny_model(Path(tmp) / "tiny", image_size=64)
        state = Path(tmp) / "state"
        child = [
            sys.executable,
            "-m",
            "benchmarks.edge",
            "--child",
            str(state),
            "--model-dir",
            str(model_dir),
            "--images",
            str(args.images),
            "--fsync" if args.fsync else "--no-fsync",
        ]
        run = subprocess.run(child, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        figures.update(sync_phase(state))
        figures["model_dir"] = str(model_dir)
        figures["fsync"] = args.fsync
        for key, value in figures.items():
            print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
