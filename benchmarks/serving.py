"""Serving benchmark: ONNX Runtime serving path vs anomalib's PyTorch inferencer, side by side.

``python -m benchmarks.serving [--model-dir DIR] [--ckpt CKPT] [--images N] [--duration S]
[--max-requests N] [--request-timeout S] [--clients 1,10,50] [--[no-]openvino] [--only-runtimes]``

Why: the Lambda image ships ONNX Runtime instead of torch for cold start, latency and size.
This prints the evidence in one run, on the same model and the same images:

* cold start — a fresh process: import + model load + first score (serving side in the
  clean serving venv from ``tools/clean_venv.py`` when it exists, like the image);
* warm latency p50/p95 over >= 100 images in that same process;
* HTTP throughput of the local server (the real handler, moto storage in its own process)
  with 1, 10 and 50 concurrent clients on 127.0.0.1, each level bounded in time and request
  count, with errors and timeouts counted rather than waited on;
* installed size: the serving requirements vs the torch venv;
* ``--openvino`` (default when openvino is installed): OpenVINO vs ONNX Runtime on the same
  ``model.onnx`` and the same inputs preprocessed once by ``Scorer.preprocess`` — import and
  compile/load time, warm inference p50/p95, max |pred_score| and |anomaly_map| difference, with
  1 thread and the default thread count. Both run in this interpreter (the serving venv has no
  OpenVINO); OpenVINO's telemetry is opted out in the child's environment.
  ``--only-runtimes`` prints only that comparison (no torch side, no throughput).

Model: ``serving/model`` (the promoted one) with ``--ckpt`` for the torch side; without a
promoted model both sides come from the tiny PaDiM fixture (64x64). Nothing asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.paths import REPO_ROOT as REPO
from tools.clean_venv import installed_mb, site_packages, venv_dir
from tools.tiny_model import build_tiny_model, elpv_samples

TORCH_STACK = ("torch", "torchvision", "anomalib", "lightning", "timm", "nvidia", "triton", "openvino")

# Runs in a fresh interpreter. argv: side, model path, images JSON. Prints one JSON line.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
side, model, images = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from PIL import Image
if side == "onnx":
    from core.scoring import Scorer
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


# Runs in a fresh interpreter. argv: runtime (ort|openvino|openvino-f32), model dir, inputs .npy, threads
# (0 = default), output .npy for the anomaly maps. Times inference only, on the preprocessed
# inputs; prints one JSON line with timings and the pred_scores.
RUNTIME_CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
runtime, model_dir, inputs_path, threads, maps_path = sys.argv[1:6]
threads = int(threads)
import numpy as np
from core.contract import load_metadata
meta = load_metadata(model_dir, verify_sha256=False)
in_name, score_name, map_name = meta.input.name, meta.score_output, meta.anomaly_map_output
t_start = time.perf_counter()
if runtime == "ort":
    import onnxruntime
    from core.scoring import create_session, default_intra_op_threads
    t_import = time.perf_counter()
    used = threads or default_intra_op_threads()  # the serving default: the affinity mask
    precision = ["float32"]
    session = create_session(meta.model_path, used)
    t_load = time.perf_counter()
    def infer(x):
        s, m = session.run([score_name, map_name], {in_name: x})
        return s, m
else:
    import openvino as ov
    t_import = time.perf_counter()
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    if runtime == "openvino-f32":  # the CPU plugin's default is bf16 where the CPU has it
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(str(meta.model_path), "CPU", config)  # reads + converts the ONNX too
    request = compiled.create_infer_request()
    out_score, out_map = compiled.output(score_name), compiled.output(map_name)
    t_load = time.perf_counter()
    used = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[1::2] or ["?"]
    def infer(x):
        r = request.infer({in_name: x})
        return r[out_score].copy(), r[out_map].copy()
inputs = np.load(inputs_path, mmap_mode="r")
batches = [np.ascontiguousarray(inputs[i]) for i in range(len(inputs))]
t_read = time.perf_counter()
infer(batches[0])
t_first = time.perf_counter()
lat, scores, maps = [], [], []
for x in batches:
    s = time.perf_counter(); score, amap = infer(x); lat.append((time.perf_counter() - s) * 1000)
    scores.append(float(np.asarray(score, dtype=np.float64).reshape(-1)[0]))
    maps.append(np.asarray(amap, dtype=np.float32).reshape(amap.shape[-2:]))
np.save(maps_path, np.stack(maps))
print(json.dumps({"import_s": t_import - t_start, "load_s": t_load - t_import,
                  "first_s": t_first - t_read, "threads": used, "lat_ms": lat, "scores": scores,
                  "precision": precision[0], "telemetry_imported": "openvino_telemetry" in sys.modules,
                  "telemetry_consent": bool(getattr(getattr(sys.modules.get("openvino_telemetry"),
                      "Telemetry", None), "_SingletonMetaClass__single_instance", None) and
                      sys.modules["openvino_telemetry"].Telemetry().consent)}))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def torch_model_from_ckpt(ckpt: Path, model_name: str, out_dir: Path) -> Path:
    """Load an anomalib Lightning checkpoint and export it for ``TorchInferencer``."""
    import anomalib.models as models

    # Rebuilding the model from its hyper-parameters creates the pretrained backbone again: point
    # timm at the offline weights the pipeline uses instead of the network.
    from experiments.backbones import configure_offline

    configure_offline()
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


def run_runtime_child(runtime: str, model_dir: Path, inputs: Path, threads: int, maps: Path) -> dict:
    """One fresh interpreter for one (runtime, threads); returns its JSON, or {"error": ...}."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    # `import openvino` itself creates ovc's Telemetry object, which (no consent file = consent)
    # writes ~/intel/{openvino_ga_cid,stats} and may send events. This openvino_telemetry has no
    # env switch, so the child gets its own HOME holding the file `opt_in_out --opt_out` writes.
    home = maps.parent / "home"
    (home / "intel").mkdir(parents=True, exist_ok=True)
    (home / "intel" / "openvino_telemetry").write_text("0\n")
    env |= {"OPENVINO_TELEMETRY_DISABLE": "1", "HOME": str(home)}
    cmd = [sys.executable, "-c", RUNTIME_CHILD, runtime, str(model_dir), str(inputs), str(threads), str(maps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runtime_comparison(model_dir: Path, images: list[str], work: Path, openvino: bool) -> None:
    """Print ONNX Runtime vs OpenVINO on the same model file and the same preprocessed inputs."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from core.contract import load_metadata
    from core.scoring import Scorer

    meta = load_metadata(model_dir)
    holder = SimpleNamespace(metadata=meta)  # Scorer.preprocess only reads .metadata.input
    batches = np.stack([Scorer.preprocess(holder, Image.open(p)) for p in images])
    inputs = work / "inputs.npy"
    np.save(inputs, batches)
    del batches
    cpus = len(os.sched_getaffinity(0))
    runtimes = [("ort", "ORT")] + ([("openvino", "OpenVINO"), ("openvino-f32", "OV f32")] if openvino else [])
    results: dict[tuple[str, int], dict] = {}
    maps: dict[tuple[str, int], Path] = {}
    for threads in (1, 0):  # 0: each runtime's default (ORT: the serving default, the affinity mask)
        for key, _ in runtimes:
            maps[key, threads] = work / f"maps-{key}-{threads}.npy"
            results[key, threads] = run_runtime_child(key, model_dir, inputs, threads, maps[key, threads])

    sp = site_packages(REPO / ".venv")
    shape = f"{meta.input.width}x{meta.input.height}"
    print(f"\nruntimes on {meta.model_path.name} ({shape}), inference only on the same {len(images)} inputs")
    print(f"preprocessed once by Scorer.preprocess; a fresh process per column; CPUs: {cpus}")
    cols = [(k, t) for t in (1, 0) for k, _ in runtimes]
    names = dict(runtimes)
    header = "".join(f"{names[k] + (' 1 thr' if t == 1 else ' dflt'):>16}" for k, t in cols)
    print(f"{'':30}{header}")

    def row(label: str, fn) -> None:
        cells = []
        for c in cols:
            r = results[c]
            cells.append(f"{'failed' if 'error' in r else fn(r, c):>16}")
        print(f"{label:30}{''.join(cells)}")

    row("threads used", lambda r, c: str(r["threads"]))
    row("inference precision", lambda r, c: r["precision"])
    row("import (s)", lambda r, c: f"{r['import_s']:.2f}")
    row("load/compile model (s)", lambda r, c: f"{r['load_s']:.3f}")
    row("first inference (s)", lambda r, c: f"{r['first_s']:.3f}")
    for q in (50, 95):
        row(f"warm p{q} ms (n={len(images)})", lambda r, c, q=q: f"{percentile(r['lat_ms'], q):.2f}")
    row("mean ms", lambda r, c: f"{sum(r['lat_ms']) / len(r['lat_ms']):.2f}")

    def diff(r: dict, c: tuple[str, int], what: str) -> str:
        ref = results["ort", c[1]]
        if "error" in ref:
            return "n/a"
        if what == "score":
            return f"{max(abs(a - b) for a, b in zip(r['scores'], ref['scores'], strict=True)):.2e}"
        return f"{float(np.abs(np.load(maps[c]) - np.load(maps['ort', c[1]])).max()):.2e}"

    row("max |pred_score - ORT|", lambda r, c: diff(r, c, "score"))
    row("max |anomaly_map - ORT|", lambda r, c: diff(r, c, "map"))

    def decision_flips(r: dict, c: tuple[str, int]) -> str:
        ref = results["ort", c[1]]
        if "error" in ref:
            return "n/a"
        pairs = zip(r["scores"], ref["scores"], strict=True)
        return str(sum((a >= meta.threshold) != (b >= meta.threshold) for a, b in pairs))

    row("decisions != ORT", decision_flips)
    row("ov telemetry loaded/consent", lambda r, c: f"{r['telemetry_imported']}/{r['telemetry_consent']}")
    for c, r in results.items():
        if "error" in r:
            print(f"  {names[c[0]]} threads={c[1] or 'default'} failed: {r['error']}")

    def pkg_mb(*prefixes: str) -> float:
        dirs = [p for p in sp.iterdir() if p.is_dir() and p.name.lower().startswith(prefixes)]
        return sum(installed_mb(p) for p in dirs)

    print(f"\n{'installed (.venv site-packages)':30}{'onnxruntime':>16}{'openvino':>16}")
    ort_mb, ov_mb = pkg_mb("onnxruntime"), pkg_mb("openvino")  # incl. dist-info, openvino_telemetry
    print(f"{'package dirs (MB)':30}{ort_mb:>16.0f}{ov_mb:>16.0f}")
    for p in [inputs, *maps.values()]:
        p.unlink(missing_ok=True)
    shutil.rmtree(work / "home", ignore_errors=True)


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


@contextlib.contextmanager
def local_stack(model_dir: Path, table: str, bucket: str) -> Iterator[Any]:
    """moto and the local server, both on 127.0.0.1, with ``table``/``bucket`` created; yields the server.

    The one setup both serving benchmarks use. The server's and moto's logs go to
    ``$BENCH_SERVER_LOG`` (default: discarded). This process's AWS settings point at moto while it runs.
    """
    from serving.storage import create_resources
    from tools.local_server import spawn

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
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                AWS_DEFAULT_REGION="us-east-1", RESULTS_TABLE=table, RESULTS_BUCKET=bucket,
            )  # fmt: skip
            for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB"):
                os.environ.pop(key, None)
            create_resources(table, bucket)
            env = {**os.environ, "MODEL_DIR": str(model_dir), "PYTHONPATH": str(REPO)}
            # spawn() keeps reading the server's stdout (one handler log line per request): an
            # unread pipe fills after ~100 requests and then blocks every request thread.
            with spawn(env=env, cwd=REPO, log=log) as server:
                yield server
        finally:
            moto.stdin.close()
            try:
                moto.wait(timeout=30)
            except subprocess.TimeoutExpired:
                moto.kill()
                moto.wait(timeout=30)


def http_throughput(
    model_dir: Path,
    images: list[str],
    clients: list[int],
    duration: float,
    max_requests: int,
    request_timeout: float,
):
    """Start moto and the local server (both on 127.0.0.1) and measure each concurrency level."""
    bodies = []
    for p in images[:20]:
        with open(p, "rb") as fh:
            bodies.append(fh.read())
    with local_stack(model_dir, "bench", "bench") as server:
        url = server.url + "/cameras/bench/images"
        return [(n, *load_level(url, bodies, n, duration, max_requests, request_timeout)) for n in clients]


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
    parser.add_argument(
        "--openvino", action=argparse.BooleanOptionalAction,
        default=importlib.util.find_spec("openvino") is not None,
        help="also time OpenVINO on the same model.onnx and inputs (default: on if installed)",
    )  # fmt: skip
    parser.add_argument(
        "--only-runtimes", action="store_true",
        help="only the ONNX Runtime vs OpenVINO comparison: no torch side, cold-start table or throughput",
    )  # fmt: skip
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
    normal, defect = elpv_samples(max(100, args.images) - 20, 20)
    images = [str(p) for p in normal + defect]
    if args.only_runtimes:
        print(f"model: {model_dir} ({meta['model_name']}, {size}x{size}); images: {len(images)} ELPV cells")
        runtime_comparison(model_dir, images, work, args.openvino)
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.ckpt:
        torch_model = torch_model_from_ckpt(args.ckpt, meta["model_name"], work / "torch")
        torch_note = f"checkpoint {args.ckpt}"
    else:
        if meta.get("run_id") != "tiny-fixture":
            print("warning: promoted model without --ckpt; torch side is the tiny fixture", file=sys.stderr)
        torch_model = tiny_torch_model(work / "torch", size)
        torch_note = "tiny PaDiM retrained with the fixture's seed/settings"

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
    if args.openvino:
        runtime_comparison(model_dir, images, work, args.openvino)

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
