"""Serving benchmark: ONNX Runtime serving path vs anomalib's PyTorch inferencer, side by side.

``python benchmarks/serving.py [--model-dir DIR] [--ckpt CKPT] [--images N] [--duration S]
[--max-requests N] [--request-timeout S] [--clients 1,10,50]``

Why: the Lambda image ships ONNX Runtime instead of torch for cold start, latency and size.
This prints the evidence in one run, on the same model and the same images:

* cold start — a fresh process: import + model load + first score (serving side in the
  clean serving venv from ``tests/serving/clean_venv.py`` when it exists, like the image);
* warm latency p50/p95 over >= 100 images in that same process;
* HTTP throughput of the local server (the real handler, moto storage in its own process)
  with 1, 10 and 50 concurrent clients on 127.0.0.1, each level bounded in time and request
  count, with errors and timeouts counted rather than waited on;
* installed size: the serving requirements vs the torch venv.

Model: ``serving/model`` (the promoted one) with ``--ckpt`` for the torch side; without a
promoted model both sides come from the tiny PaDiM fixture (64x64). Nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.model_fixture import build_tiny_model, elpv_samples  # noqa: E402
from tests.serving.clean_venv import installed_mb, site_packages, venv_dir  # noqa: E402

TORCH_STACK = ("torch", "torchvision", "anomalib", "lightning", "timm", "nvidia", "triton", "openvino")

# Runs in a fresh interpreter. argv: side, model path, images JSON. Prints one JSON line.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
side, model, images = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from PIL import Image
if side == "onnx":
    from serving.scoring import Scorer
    t_import = time.perf_counter()
    scorer = Scorer.from_dir(model)
    t_load = time.perf_counter()
    score = lambda im: scorer.score(im).score
else:
    import torch
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    from anomalib.deploy import TorchInferencer
    t_import = time.perf_counter()
    inferencer = TorchInferencer(path=model, device="cpu")
    t_load = time.perf_counter()
    score = lambda im: float(inferencer.predict(im).pred_score.reshape(-1)[0])
loaded = [Image.open(p).convert("RGB") for p in images]
t_read = time.perf_counter()
score(loaded[0])
t_first = time.perf_counter()
lat = []
for im in loaded:
    s = time.perf_counter(); score(im); lat.append((time.perf_counter() - s) * 1000)
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import,
                  "first_score_s": t_first - t_read, "read_s": t_read - t_load, "lat_ms": lat}))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def torch_model_from_ckpt(ckpt: Path, model_name: str, out_dir: Path) -> Path:
    """Load an anomalib Lightning checkpoint and export it for ``TorchInferencer``."""
    import anomalib.models as models

    cls = next(getattr(models, n) for n in models.__all__ if n.lower() == model_name.lower())
    return cls.load_from_checkpoint(str(ckpt), map_location="cpu").to_torch(out_dir)


def tiny_torch_model(out_dir: Path, image_size: int) -> Path:
    """Train the fixture's tiny PaDiM again (same seed and settings) and export it to torch."""
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from lightning.pytorch import seed_everything
    from PIL import Image

    seed_everything(42, workers=True)
    normal, defect = elpv_samples()
    for label, paths in (("good", normal), ("defect", defect)):
        (out_dir / "data" / label).mkdir(parents=True, exist_ok=True)
        for p in paths:
            Image.open(p).convert("RGB").save(out_dir / "data" / label / p.name)
    datamodule = Folder(
        name="bench", root=out_dir / "data", normal_dir="good", abnormal_dir="defect",
        normal_split_ratio=0.25, train_batch_size=8, eval_batch_size=8, num_workers=0, seed=42,
    )  # fmt: skip
    model = Padim(
        backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, n_features=32,
        pre_processor=Padim.configure_pre_processor((image_size, image_size)),
        evaluator=False, visualizer=False,
    )  # fmt: skip
    engine = Engine(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        default_root_dir=out_dir / "engine",  # checkpointing stays on: a 2nd Engine in-process rejects False
    )  # fmt: skip
    engine.fit(model=model, datamodule=datamodule)
    return model.to_torch(out_dir / "export")


def run_child(python: Path, side: str, model: Path, images: list[str], pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}
    if side == "torch":  # the .pt is a pickle anomalib refuses by default; we just wrote it ourselves
        env["TRUST_REMOTE_CODE"] = "1"
    started = time.time()
    proc = subprocess.run(
        [str(python), "-c", CHILD, side, str(model), json.dumps(images)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{side} child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cold_start_s"] = result["import_s"] + result["load_s"] + result["first_score_s"]
    result["process_wall_s"] = time.time() - started
    return result


def load_level(
    url: str,
    bodies: list[bytes],
    clients: int,
    duration: float,
    max_requests: int,
    request_timeout: float = 30.0,
) -> tuple[int, int, int, float, list[float]]:
    """``clients`` threads post images for ``duration`` s or ``max_requests``; (ok, errors, timeouts, s, ms).

    Bounded: no request starts after the deadline, and each one's socket timeout is at most
    ``request_timeout``, so a level takes at most ``duration + request_timeout`` (plus connect).
    Failures are counted, never raised: non-200 / connection errors in ``errors``, requests that
    hit the timeout in ``timeouts``.
    """
    if urlsplit(url).hostname != "127.0.0.1":
        raise ValueError(f"benchmark traffic stays on loopback, not {url}")
    latencies: list[float] = []
    errors = timeouts = issued = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def worker(_: int) -> None:
        nonlocal errors, timeouts, issued
        while time.perf_counter() < deadline:
            with lock:
                if issued >= max_requests:
                    return
                issued += 1
                i = issued
            req = urllib.request.Request(
                url, data=bodies[i % len(bodies)], method="POST",
                headers={"Content-Type": "image/png", "X-Request-Id": f"bench-{clients}-{i}"},
            )  # fmt: skip
            t = time.perf_counter()
            outcome = "error"
            try:
                with urllib.request.urlopen(req, timeout=request_timeout) as resp:
                    resp.read()
                    outcome = "ok" if resp.status == 200 else "error"
            except TimeoutError:
                outcome = "timeout"
            except urllib.error.URLError as exc:
                outcome = "timeout" if isinstance(exc.reason, TimeoutError) else "error"
            except OSError:
                outcome = "error"
            with lock:
                if outcome == "ok":
                    latencies.append((time.perf_counter() - t) * 1000)
                elif outcome == "timeout":
                    timeouts += 1
                else:
                    errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(worker, range(clients)))
    return len(latencies), errors, timeouts, time.perf_counter() - t0, latencies


# moto in its own process (like the real services, and apart from the benchmark's client
# threads): prints its endpoint, serves until its stdin closes. Its access log goes to stderr.
MOTO_CHILD = r"""
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("http://{}:{}".format(*server.get_host_and_port()), flush=True)
sys.stdin.read()
server.stop()
"""


def http_throughput(
    model_dir: Path,
    images: list[str],
    clients: list[int],
    duration: float,
    max_requests: int,
    request_timeout: float,
):
    """Start moto and the local server (both on 127.0.0.1) and measure each concurrency level."""
    from serving.local_server import spawn
    from serving.storage import create_resources

    bodies = []
    for p in images[:20]:
        with open(p, "rb") as fh:
            bodies.append(fh.read())
    log_path = os.environ.get("BENCH_SERVER_LOG", os.devnull)
    with open(log_path, "w") as log:
        moto = subprocess.Popen(
            [sys.executable, "-c", MOTO_CHILD], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        assert moto.stdout is not None and moto.stdin is not None
        try:
            endpoint = moto.stdout.readline().strip()
            if not endpoint.startswith("http://127.0.0.1:"):
                raise RuntimeError(f"moto did not start (exit code {moto.poll()}); see {log_path}")
            aws = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
            }
            aws |= {"AWS_DEFAULT_REGION": "us-east-1", "RESULTS_TABLE": "bench", "RESULTS_BUCKET": "bench"}
            os.environ.update(aws)
            for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB"):
                os.environ.pop(key, None)
            create_resources("bench", "bench")
            env = {**os.environ, "MODEL_DIR": str(model_dir), "PYTHONPATH": str(REPO)}
            # spawn() keeps reading the server's stdout (one handler log line per request): an
            # unread pipe fills after ~100 requests and then blocks every request thread.
            with spawn(env=env, cwd=REPO, log=log) as server:
                url = server.url + "/cameras/bench/images"
                return [
                    (n, *load_level(url, bodies, n, duration, max_requests, request_timeout)) for n in clients
                ]
        finally:
            moto.stdin.close()
            try:
                moto.wait(timeout=30)
            except subprocess.TimeoutExpired:
                moto.kill()
                moto.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving" / "model")
    parser.add_argument("--ckpt", type=Path, help="anomalib checkpoint of the same model (torch side)")
    parser.add_argument("--images", type=int, default=120, help="warm-latency images (>= 100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput level")
    parser.add_argument("--max-requests", type=int, default=500, help="requests per throughput level")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument(
        "--clients", default="1,10,50", help="comma-separated concurrency levels (default 1,10,50)"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",") if n.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    model_dir = args.model_dir
    if not (model_dir / "metadata.json").is_file():
        model_dir = REPO / ".cache" / "bench-tiny-model"
        if not (model_dir / "metadata.json").is_file():
            print(f"no promoted model; building the tiny fixture in {model_dir}", file=sys.stderr)
            build_tiny_model(model_dir, image_size=64)
    meta = json.loads((model_dir / "metadata.json").read_text())
    size = meta["input"]["height"]
    if args.ckpt:
        torch_model = torch_model_from_ckpt(args.ckpt, meta["model_name"], work / "torch")
        torch_note = f"checkpoint {args.ckpt}"
    else:
        if meta.get("run_id") != "tiny-fixture":
            print("warning: promoted model without --ckpt; torch side is the tiny fixture", file=sys.stderr)
        torch_model = tiny_torch_model(work / "torch", size)
        torch_note = "tiny PaDiM retrained with the fixture's seed/settings"

    normal, defect = elpv_samples(max(100, args.images) - 20, 20)
    images = [str(p) for p in normal + defect]

    clean = venv_dir()
    clean_python = clean / "bin" / "python"
    serving_python = clean_python if (clean / ".complete").exists() else Path(sys.executable)
    onnx = run_child(serving_python, "onnx", model_dir, images, str(REPO))
    torch = run_child(Path(sys.executable), "torch", torch_model, images, str(REPO))

    print(f"\nmodel: {model_dir} ({meta['model_name']}, {size}x{size}); torch side: {torch_note}")
    print(f"images: {len(images)} ELPV cells; CPUs: {len(os.sched_getaffinity(0))}")
    print(f"serving interpreter: {serving_python}")
    print(f"\n{'':32}{'ONNX Runtime (serving)':>24}{'anomalib TorchInferencer':>28}")
    rows = [
        ("cold: import (s)", "import_s", "{:.2f}"),
        ("cold: model load (s)", "load_s", "{:.3f}"),
        ("cold: first score (s)", "first_score_s", "{:.3f}"),
        ("cold start total (s)", "cold_start_s", "{:.2f}"),
        ("whole process wall (s)", "process_wall_s", "{:.2f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:32}{fmt.format(onnx[key]):>24}{fmt.format(torch[key]):>28}")
    for q in (50, 95):
        a, b = percentile(onnx["lat_ms"], q), percentile(torch["lat_ms"], q)
        print(f"{f'warm p{q} (ms, n={len(images)})':32}{a:>24.2f}{b:>28.2f}")

    clean_mb = installed_mb(site_packages(clean)) if (clean / ".complete").exists() else float("nan")
    main_sp = site_packages(REPO / ".venv")
    torch_mb = sum(installed_mb(p) for p in main_sp.iterdir() if p.name.lower().startswith(TORCH_STACK))
    print(f"\n{'installed: serving venv (MB)':32}{clean_mb:>24.0f}")
    main_mb = installed_mb(main_sp)
    print(f"{'installed: main venv (MB)':32}{main_mb:>24.0f}   of which torch stack {torch_mb:.0f}")

    print("\nHTTP throughput, local server (real handler, moto S3+DynamoDB, loopback):")
    bound = (
        f"<= {args.max_requests} requests or {args.duration:g} s, request timeout {args.request_timeout:g} s"
    )
    print(f"(each level: {bound})")
    print(f"{'clients':>8}{'ok':>7}{'errors':>8}{'timeouts':>10}{'wall s':>8}{'req/s':>9}", end="")
    print(f"{'p50 ms':>9}{'p95 ms':>9}")
    for n, ok, errors, timeouts, elapsed, lat in http_throughput(
        model_dir, images, levels, args.duration, args.max_requests, args.request_timeout
    ):
        p50 = percentile(lat, 50) if lat else float("nan")
        p95 = percentile(lat, 95) if lat else float("nan")
        print(
            f"{n:>8}{ok:>7}{errors:>8}{timeouts:>10}{elapsed:>8.1f}{ok / elapsed:>9.1f}{p50:>9.1f}{p95:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
