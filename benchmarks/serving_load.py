"""Load benchmark of the local HTTP server with the real handler and storage on loopback (moto).

``python -m benchmarks.serving_load [--model-dir DIR] [--clients 1,10,50] [--duration 30]``

For each concurrency level, ``clients`` threads post ELPV cells to ``/cameras/bench-<n>/images``
for ``--duration`` seconds (bounded: no request starts after the deadline, each has a socket
timeout). It prints requests/s, p50/p95 latency, errors and timeouts, then checks storage for
that camera: complete DynamoDB items, overlay and mask objects, items whose objects are missing
(dangling) and objects no item references (orphans) — the promise is items = overlays = 200s
and no dangling or orphan. moto runs in its own process, the server in another; nothing asserts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.serving import load_level, local_stack, percentile
from config.paths import REPO_ROOT as REPO
from tools.tiny_model import build_tiny_model, elpv_samples

TABLE = BUCKET = "bench-load"


def storage_check(camera: str) -> dict[str, int]:
    """Count items and objects of one camera and the broken links between them."""
    import boto3

    from serving.storage import ResultStore

    store = ResultStore(TABLE, BUCKET)
    items, token = [], None
    while True:
        page, token = store.query(camera, limit=100, next_token=token)
        items += page
        if not token:
            break
    s3 = boto3.client("s3")
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"results/{camera}/"):
        keys |= {o["Key"] for o in page.get("Contents", [])}
    referenced = {i[k] for i in items for k in ("overlay_key", "mask_key") if i.get(k)}
    return {
        "items": len(items),
        "overlays": sum(k.endswith("-overlay.png") for k in keys),
        "masks": sum(k.endswith("-mask.png") for k in keys),
        "dangling": len(referenced - keys),
        "orphans": len(keys - referenced),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving" / "model")
    parser.add_argument("--clients", default="1,10,50")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if not (model_dir / "metadata.json").is_file():
            print("no promoted model: using the tiny PaDiM fixture (64x64)", flush=True)
            model_dir = build_tiny_model(Path(tmp) / "model", image_size=64)
        normal, defect = elpv_samples(16, 4)
        bodies = [p.read_bytes() for p in normal + defect]
        with local_stack(model_dir, TABLE, BUCKET) as server:
            header = ("clients", "req/s", "p50 ms", "p95 ms", "200s", "errors", "timeouts", "items",
                      "overlays", "masks", "dangling", "orphans")  # fmt: skip
            print(" ".join(f"{h:>8}" for h in header), flush=True)
            for n in (int(c) for c in args.clients.split(",")):
                camera = f"bench-{n}"
                ok, errors, timeouts, seconds, ms = load_level(
                    f"{server.url}/cameras/{camera}/images", bodies, n, args.duration,
                    args.max_requests, args.request_timeout,
                )  # fmt: skip
                check = storage_check(camera)
                p50 = percentile(ms, 50) if ms else float("nan")
                p95 = percentile(ms, 95) if ms else float("nan")
                row = (n, f"{ok / seconds:.1f}", f"{p50:.0f}", f"{p95:.0f}", ok, errors, timeouts,
                       *check.values())  # fmt: skip
                print(" ".join(f"{v:>8}" for v in row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
