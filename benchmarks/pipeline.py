"""Training-side benchmark: per-model cost and quality, read from the pipeline's own outputs.

Usage::

    python -m benchmarks.pipeline                 # table from build/{models,eval}/<model>/*.json
    python -m benchmarks.pipeline --run           # time `dvc repro` (a no-op when up to date)
    python -m benchmarks.pipeline --run --force   # time a full `dvc repro --force` from scratch
    python -m benchmarks.pipeline --json          # machine-readable

Why read outputs instead of re-running models: the stages already measure what matters (fit time
and peak RSS in ``train.json``; scoring-pass time, latencies and metrics in ``metrics.json``), so
the benchmark reports the numbers of the run that produced the deployed artefacts, not of a
different run on a differently loaded machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from config.params import load_params
from config.paths import REPO_ROOT

COLUMNS = (
    ("model", "model", "{}"),
    ("train_time_s", "train s", "{:.1f}"),
    ("test_time_s", "test s", "{:.1f}"),
    ("peak_rss_mb", "peak MB", "{:.0f}"),
    ("image_AUROC", "img AUROC", "{:.4f}"),
    ("image_F1Score", "img F1", "{:.4f}"),
    ("latency_ms", "ORT ms", "{:.1f}"),
    ("torch_latency_ms", "torch ms", "{:.1f}"),
    ("model_size_mb", "ONNX MB", "{:.1f}"),
    ("onnx_max_abs_diff", "|ORT-torch|", "{:.2g}"),
)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_names(root: Path = REPO_ROOT) -> list[str]:
    """Models in params.yaml order (the order DVC runs them)."""
    return load_params(root / "params.yaml").model_names


def collect(root: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """One row per model; missing outputs show as NaN rather than failing the whole report."""
    rows = []
    for name in model_names(root):
        train = _read_json(root / "build" / "models" / name / "train.json")
        metrics = _read_json(root / "build" / "eval" / name / "metrics.json")
        peaks = [v for v in (train.get("peak_rss_mb"), metrics.get("eval_peak_rss_mb")) if v is not None]
        row: dict[str, Any] = {"model": name}
        row["train_time_s"] = train.get("train_time_s", math.nan)
        row["peak_rss_mb"] = max(peaks) if peaks else math.nan
        for key, *_ in COLUMNS[2:]:
            if key != "peak_rss_mb":
                row[key] = metrics.get(key, math.nan)
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """Plain-text table (fixed-width, no extra dependency)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            line.append("-" if missing else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)


def device_used(rows: list[dict[str, Any]], root: Path = REPO_ROOT) -> str:
    """The training device: what train.json recorded (``device``/``accelerator``), else what torch sees.

    The train stage records the device it used (``train.accelerator: auto`` picks a GPU when one is
    present); before such outputs exist, fall back to what this machine offers.
    """
    seen = set()
    for row in rows:
        train = _read_json(root / "build" / "models" / row["model"] / "train.json")
        value = train.get("device") or train.get("accelerator")
        if value:
            seen.add(str(value))
    if seen:
        return ", ".join(sorted(seen)) + " (from train.json)"
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)}; no train.json records it yet)"
    except ImportError:
        pass
    return "cpu (no GPU visible; no train.json records it yet)"


def run_repro(force: bool) -> float:
    """Run ``dvc repro`` from the repo root with the venv first on PATH; return wall seconds."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    cmd = ["dvc", "repro", *(["--force"] if force else [])]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run `dvc repro` first and report its wall time")
    parser.add_argument("--force", action="store_true", help="with --run: `dvc repro --force` (all stages)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    wall = run_repro(args.force) if args.run else None
    rows = collect()
    device = device_used(rows)
    if args.json:
        print(json.dumps({"models": rows, "repro_wall_s": wall, "device": device}, indent=2))
        return
    print(f"training device: {device}")
    print(render(rows))
    total_train = sum(r["train_time_s"] for r in rows if not math.isnan(r["train_time_s"]))
    total_test = sum(r["test_time_s"] for r in rows if not math.isnan(r["test_time_s"]))
    print(f"\nsum of fit times {total_train:.1f} s, sum of test (scoring pass) times {total_test:.1f} s")
    if wall is not None:
        print(f"dvc repro{' --force' if args.force else ''} wall time: {wall:.1f} s ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
