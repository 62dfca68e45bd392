"""Decode-cost benchmark: peak memory and time per request for 1, 12 and 40 megapixel inputs.

``python -m benchmarks.serving_decode [--model-dir DIR] [--memory-mb 2048]``

Each (size, format, configuration) runs in a fresh interpreter that loads the model, warms up
on a small image, then serves one request through the real code path minus the network:
``parse_event`` (bounded decode) → score → analyse (mask, regions) → mask PNG → overlay PNG.
Peak memory is the peak RSS during the request (``VmHWM``, reset through ``/proc/self/clear_refs``
just before it; Linux only) minus the RSS before it, i.e. what the request itself added on top of
the loaded function. Configurations:

* ``bounded``   — the defaults on a function of ``--memory-mb`` (memory-sized pixel cap, JPEG
  draft decoding, box-reduce to the 4 MP working size);
* ``unbounded`` — cap and working size raised to 100 MP: full-resolution decode, scoring input
  and overlay, as before the bounds existed.

``MAX_BODY_BYTES`` is raised to 128 MB in both so that the decoder, not the 6 MB API limit, is
measured. Synthetic, smooth pictures (gradients + shapes) keep PNGs small, like a decompression
bomb; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from config.paths import REPO_ROOT as REPO

SIZES = {"1 MP": (1155, 866), "12 MP": (4000, 3000), "40 MP": (7300, 5480)}

CHILD = r"""
import base64, json, sys, time
from PIL import Image
from core.answer import analyse, mask_png
from serving.events import RequestError, RequestLimits, parse_event
from core.scoring import Scorer, overlay

model_dir, path, content_type = sys.argv[1], sys.argv[2], sys.argv[3]
scorer = Scorer.from_dir(model_dir)
limits = RequestLimits.from_env()

def event(data, ctype):
    return {"version": "2.0", "requestContext": {"requestId": "bench", "domainName": "x"},
            "headers": {"content-type": ctype}, "pathParameters": {"camera_id": "bench"},
            "body": base64.b64encode(data).decode(), "isBase64Encoded": True}

def serve(data, ctype):
    request = parse_event(event(data, ctype), limits)
    result = scorer.score(request.image)
    analysis = analyse(result.anomaly_map, scorer.threshold, request.image.size, request.original_size)
    mask_png(analysis.mask)
    overlay(request.image, result.anomaly_map, resize=result.resize)
    return request

import io
small = io.BytesIO(); Image.new("RGB", (320, 240), (90, 90, 90)).save(small, format="PNG")
serve(small.getvalue(), "image/png")
data = open(path, "rb").read()

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
base = status_kb("VmRSS")
t = time.perf_counter()
try:
    request = serve(data, content_type)
    outcome = {"status": 200, "working": list(request.image.size)}
except RequestError as exc:
    outcome = {"status": exc.status, "code": exc.code}
elapsed = time.perf_counter() - t
peak = status_kb("VmHWM")
print(json.dumps({**outcome, "ms": elapsed * 1000, "peak_mb": (peak - base) / 1024, "rss_mb": peak / 1024}))
"""


def make_image(size: tuple[int, int], fmt: str, out: Path) -> Path:
    """A smooth synthetic picture (gradients, a disc and a bar) at ``size``, saved as ``fmt``."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((w // 3, h // 3, w // 2, h // 2), fill=(20, 20, 20))
    draw.rectangle((w // 10, h // 2, w // 2, h // 2 + h // 50), fill=(230, 230, 230))
    path = out / f"{w}x{h}.{fmt.lower()}"
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "serving" / "model")
    parser.add_argument("--memory-mb", type=int, default=2048, help="AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model_dir
        if os.environ.get("SERVING_MODEL_DIR"):
            model_dir = Path(os.environ["SERVING_MODEL_DIR"])
        if not (model_dir / "metadata.json").is_file():
            from tools.tiny_model import build_tiny_model

            print("no promoted model: using the tiny PaDiM fixture (64x64)", flush=True)
            model_dir = build_tiny_model(work / "model", image_size=64)
        configs = {
            "bounded": {},
            "unbounded": {"MAX_IMAGE_PIXELS": "100000000", "MAX_WORKING_PIXELS": "100000000"},
        }
        print(f"function memory {args.memory_mb} MB; model {model_dir}")
        print(f"{'input':>7} {'format':>6} {'file MB':>8} {'config':>10} {'status':>14} {'working':>11} "
              f"{'ms':>8} {'peak MB':>8}")  # fmt: skip
        for label, size in SIZES.items():
            for fmt, content_type in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
                path = make_image(size, fmt, work)
                for config, extra in configs.items():
                    env = {
                        **os.environ,
                        "PYTHONPATH": str(REPO),
                        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(args.memory_mb),
                        "MAX_BODY_BYTES": str(128 * 1024 * 1024),
                        "ORT_INTRA_OP_THREADS": "1",
                        **extra,
                    }
                    run = subprocess.run(
                        [sys.executable, "-c", CHILD, str(model_dir), str(path), content_type],
                        env=env, capture_output=True, text=True, timeout=600,
                    )  # fmt: skip
                    if run.returncode != 0:
                        print(f"{label:>7} {fmt:>6} failed: {run.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    status = str(r["status"]) + (f" {r['code']}" if "code" in r else "")
                    working = "x".join(map(str, r.get("working", []))) or "-"
                    print(f"{label:>7} {fmt:>6} {path.stat().st_size / 1e6:>8.2f} {config:>10} {status:>14} "
                          f"{working:>11} {r['ms']:>8.0f} {r['peak_mb']:>8.0f}", flush=True)  # fmt: skip
                path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
