"""Peak memory of ``evaluate`` with pixel masks: 1,000 masked test images at 256 px (issue #6, item 1).

Usage::

    python -m benchmarks.pixel_metrics_memory [--n-defect 1000] [--n-good 100] [--model padim]
        [--work /tmp/pixel-bench] [--keep]

Synthesises an MVTec-layout data set (seeded: grey textured 256x256 images; every defect image
carries 1-6 bright blobs and its mask), then runs the pipeline's own stages as subprocesses --
``prepare``, ``train``, ``evaluate --no-mlflow`` -- with ``data.val_defect_ratio: 0`` so that all
defect images are scored, and prints evaluate's peak RSS (``eval_peak_rss_mb`` in metrics.json,
``VmHWM`` of the evaluate process) against the 3 GB target, its scoring-pass time
(``test_time_s``: torch + ONNX Runtime per image) and the pixel metrics. anomalib's old ``PRO`` on
such a set asked for tens of GB, and anomalib's ``engine.test`` (which evaluate no longer runs)
grew by ~0.7 MB per test image.

Nothing here asserts; it prints figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from config.params import read_yaml
from config.paths import PARAMS_FILE, REPO_ROOT

SIZE = 256
TARGET_MB = 3000  # issue #6: evaluate's peak RSS for 1,000 masked test images at 256 px


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A normal image: smooth grey gradient plus fine noise (stands in for a product surface)."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    base = 110 + 30 * np.sin(2 * np.pi * (xx * rng.uniform(1, 2) + yy * rng.uniform(0, 1)))
    return np.clip(base + rng.normal(0, 8, (SIZE, SIZE)), 0, 255)


def synthesise(root: Path, n_train: int, n_good: int, n_defect: int, seed: int = 0) -> int:
    """Write the data set; return the number of mask regions (blobs) drawn."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    regions = 0
    for folder, count in (("train/good", n_train), ("test/good", n_good)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(_texture(rng).astype(np.uint8)).save(root / folder / f"{i:05d}.png")
    (root / "test/defect").mkdir(parents=True)
    (root / "ground_truth/defect").mkdir(parents=True)
    for i in range(n_defect):
        image, mask = _texture(rng), np.zeros((SIZE, SIZE), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 7))):
            cy, cx = (int(v) for v in rng.integers(12, SIZE - 12, 2))
            r = int(rng.integers(3, 12))
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            image[blob] = 230
            mask[blob] = 255
            regions += 1
        Image.fromarray(image.astype(np.uint8)).save(root / "test/defect" / f"d{i:05d}.png")
        Image.fromarray(mask).save(root / "ground_truth/defect" / f"d{i:05d}_mask.png")
    return regions


def _stage(module: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-defect", type=int, default=1000)
    parser.add_argument("--n-good", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--model", default="padim")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixel-metrics-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    shutil.rmtree(args.work, ignore_errors=True)
    regions = synthesise(args.work / "data", args.n_train, args.n_good, args.n_defect)
    params = read_yaml(PARAMS_FILE)  # raw: this writes a params file for the stages
    params["data"] |= {
        "root": str(args.work / "data"),
        "image_size": SIZE,
        "max_train": args.n_train,
        "max_test_good": args.n_good,
        "max_test_defect": args.n_defect,
        "val_defect_ratio": 0.0,  # score every defect image
    }
    params["evaluate"] |= {"n_heatmaps": 2, "latency_repeats": 5}
    params_path = args.work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    common = ["--params", str(params_path)]
    dataset, models, out = args.work / "dataset", args.work / "models", args.work / "eval"

    times = {
        "prepare": _stage(
            "experiments.prepare", *common, "--out", str(dataset), "--report", str(args.work / "r.json")
        )
    }
    times["train"] = _stage(
        "experiments.train", args.model, *common, "--dataset", str(dataset), "--out", str(models)
    )
    times["evaluate"] = _stage(
        "experiments.evaluate", args.model, *common, "--dataset", str(dataset), "--models", str(models),
        "--out", str(out), "--no-mlflow",
    )  # fmt: skip
    metrics = json.loads((out / args.model / "metrics.json").read_text())
    summary = json.loads((out / args.model / "summary.json").read_text())
    scored = summary["splits"]["scored"]
    print(
        f"data: {args.n_defect} masked defect images ({regions} mask regions) + {args.n_good} normal, "
        f"{SIZE} px"
    )
    print(f"scored: {scored['n_anomalous']} anomalous + {scored['n_normal']} normal images")
    peak = metrics["eval_peak_rss_mb"]
    verdict = "UNDER" if peak < TARGET_MB else "OVER"
    print(f"evaluate peak RSS: {peak:,.0f} MB -> {verdict} the {TARGET_MB:,} MB target")
    print(
        f"evaluate wall time: {times['evaluate']:.0f} s "
        f"(scoring pass, torch + ONNX Runtime per image: {metrics['test_time_s']:.0f} s)"
    )
    print(f"train wall time: {times['train']:.0f} s, peak RSS {metrics['train_peak_rss_mb']:.0f} MB")
    print(f"pixel_AUROC {metrics['pixel_AUROC']:.4f}  pixel_AUPRO {metrics['pixel_AUPRO']:.4f}  "
          f"image_AUROC {metrics['image_AUROC']:.4f}  image_F1Score {metrics['image_F1Score']:.4f}  "
          f"({summary['n_test_images']} images scored)")  # fmt: skip
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
