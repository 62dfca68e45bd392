"""INT8 vs fp32 benchmark: per-image latency, images/s, validation AUROC and the gate, per model type.

``python -m benchmarks.quantize [--models padim,patchcore] [--eval-dir build/eval]
[--dataset build/dataset] [--params params.yaml] [--threads 1,2] [--rounds 3] [--out FILE.json]``

For each evaluated model (``build/eval/<model>/onnx/model.onnx``, the export promote would serve)
it makes the INT8 model exactly as promote does (:func:`registry.quantize.quantize_and_gate`:
calibration on validation normals, gate on the validation split with params.yaml's limits), and
times three graphs on the same prepared inputs (validation + test images at the model's size,
prepared once by :func:`core.preprocess.model_input`):

* ``fp32``: the evaluated export, as served today;
* ``fp32+sep``: the same graph with only the exact separable-blur rewrite (no quantization), so the
  speed-up can be split between the rewrite and the INT8 backbone;
* ``int8``: what promote writes as ``model.int8.onnx`` (when the gate passes).

Sessions come from :func:`core.scoring.create_session` (serving's settings) with each thread count
in ``--threads``. The variants are timed in interleaved rounds (one pass over all images per
variant per round), so load from other processes on a shared machine hits them alike; ratios are
therefore more trustworthy than absolute figures. Latency is ``session.run`` per image (batch 1);
images/s is images / summed run time of a variant. Nothing asserts; a model whose INT8 version
fails the gate is reported with the gate's reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from config.params import load_params
from config.paths import REPO_ROOT
from core.scoring import create_session
from experiments.datamodule import defect_dirs
from registry.promote import summary_image_size, summary_resize
from registry.quantize import (
    QuantizeSettings,
    Sample,
    load_input,
    quantize_and_gate,
    score_split,
    separable_blur,
    validation_samples,
)
from registry.select import load_summary

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _inputs(dataset: Path, size: tuple[int, int], resize: str, limit: int) -> list[np.ndarray]:
    """Validation then test images, prepared as serving prepares them (at most ``limit``)."""
    paths = [s.path for s in validation_samples(dataset)]
    test = dataset / "test"
    if test.is_dir():
        paths += sorted(p for p in test.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [load_input(p, size, resize) for p in paths[:limit]]


def _test_samples(dataset: Path) -> list[Sample]:
    """The held-out test split (good = 0, every defect folder = 1), sorted."""
    folders = [("test/good", 0)] + [(rel, 1) for rel in defect_dirs(dataset, "test")]
    return [
        Sample(p, label)
        for rel, label in folders
        for p in sorted((dataset / rel).glob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def _separable_copy(fp32: Path, out: Path) -> Path:
    import onnx

    model = onnx.load(str(fp32))
    separable_blur(model)
    onnx.save(model, str(out))
    return out


def _time(variants: dict[str, Path], inputs: list[np.ndarray], threads: int, rounds: int) -> dict[str, Any]:
    """Interleaved timing of every variant: per-image ms p50/p95 and images/s."""
    sessions = {name: create_session(path, threads) for name, path in variants.items()}
    names = {name: s.get_inputs()[0].name for name, s in sessions.items()}
    for name, session in sessions.items():  # warm-up: first runs allocate and pick kernels
        for x in inputs[:5]:
            session.run(None, {names[name]: x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for x in inputs:
                start = time.perf_counter()
                session.run(None, {names[name]: x})
                times[name].append(time.perf_counter() - start)
    result = {}
    for name, values in times.items():
        ms = np.asarray(values) * 1000.0
        result[name] = {
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "images_per_s": round(len(ms) / (ms.sum() / 1000.0), 1),
            "n": len(ms),
        }
    return result


def benchmark_model(
    model: str,
    eval_dir: Path,
    dataset: Path,
    settings: QuantizeSettings,
    threads: list[int],
    rounds: int,
    n_images: int,
    work: Path,
) -> dict[str, Any]:
    """Quantize + gate one model as promote would, then time fp32, fp32+sep and int8."""
    summary = load_summary(eval_dir, model)
    size, resize = summary_image_size(summary), summary_resize(summary)  # exactly as promote reads them
    fp32 = eval_dir / model / "onnx" / "model.onnx"
    int8 = work / f"{model}.int8.onnx"
    start = time.perf_counter()
    gate = quantize_and_gate(
        fp32, int8, dataset, size, resize, settings, float(summary.get("threshold", 0.5))
    )
    gate_s = time.perf_counter() - start
    if not int8.is_file():  # refused: time it anyway (re-made) so the cost of the refusal is visible
        from registry.quantize import quantize_model

        normals = [s for s in validation_samples(dataset) if s.label == 0][: settings.calibration_images]
        quantize_model(fp32, int8, [load_input(s.path, size, resize) for s in normals])
    variants = {"fp32": fp32, "fp32+sep": _separable_copy(fp32, work / f"{model}.sep.onnx"), "int8": int8}
    # Image AUROC of every variant on validation (the gate's split) and on the held-out test split.
    auroc = {}
    for split, samples in (("val", validation_samples(dataset)), ("test", _test_samples(dataset))):
        for name, path in variants.items():
            auroc[f"{split}_image_AUROC_{name}"] = score_split(path, samples, size, resize).image_auroc
    inputs = _inputs(dataset, size, resize, n_images)
    timing = {str(t): _time(variants, inputs, t, rounds) for t in threads}
    return {
        "model": model,
        "image_size": list(size),
        "evaluate_test_image_AUROC": summary.get("metrics", {}).get("image_AUROC"),
        "image_AUROC": {k: None if v is None else round(v, 4) for k, v in auroc.items()},
        "gate": gate,
        "quantize_and_gate_s": round(gate_s, 1),
        "size_mb": {k: round(p.stat().st_size / 1e6, 2) for k, p in variants.items()},
        "timing": timing,
    }


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<10} {'thr':>3} {'variant':<9} {'p50 ms':>7} {'p95 ms':>7} {'img/s':>7} {'x fp32':>7} "
        f"{'val AUROC':>9} {'test AUROC':>10} {'gate':>5}"
    )

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for row in rows:
        gate, auroc = row["gate"], row["image_AUROC"]
        for threads, timing in row["timing"].items():
            base = timing["fp32"]["images_per_s"]
            for variant, t in timing.items():
                verdict = ("pass" if gate["passed_gate"] else "FAIL") if variant == "int8" else ""
                print(
                    f"{row['model']:<10} {threads:>3} {variant:<9} {t['p50_ms']:>7.2f} {t['p95_ms']:>7.2f} "
                    f"{t['images_per_s']:>7.1f} {t['images_per_s'] / base:>7.2f} "
                    f"{shown(auroc[f'val_image_AUROC_{variant}']):>9} "
                    f"{shown(auroc[f'test_image_AUROC_{variant}']):>10} {verdict:>5}"
                )
        print(f"{'':<10} gate: {gate['why']}")
        print(
            f"{'':<10} validation verdicts unchanged at the threshold: {gate['val_decision_agreement']:.1%}, "
            f"max |pred_score| change {gate['val_max_abs_score_diff']:.3f}; quantize + gate took "
            f"{row['quantize_and_gate_s']} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="padim,patchcore")
    parser.add_argument("--eval-dir", type=Path, default=REPO_ROOT / "build" / "eval")
    parser.add_argument("--dataset", type=Path, default=REPO_ROOT / "build" / "dataset")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts to time")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved passes over the images per variant"
    )
    parser.add_argument("--images", type=int, default=100, help="images per pass")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    settings = QuantizeSettings.from_params(load_params(args.params))
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            if not (args.eval_dir / model / "onnx" / "model.onnx").is_file():
                print(
                    f"{model}: no evaluated export in {args.eval_dir} (dvc repro evaluate@{model})",
                    file=sys.stderr,
                )
                continue
            rows.append(
                benchmark_model(
                    model, args.eval_dir, args.dataset, settings, threads, args.rounds, args.images, Path(tmp)
                )
            )
    _print(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
