"""DVC stage ``evaluate@<model>``: test a trained model, export it to ONNX, check it, log it to MLflow.

Usage: ``python -m experiments.evaluate <model> [--params params.yaml] [--dataset build/dataset]
[--models build/models] [--out build/eval] [--no-mlflow]``.

Steps, and why:

1. ``engine.test`` with anomalib's evaluator on the held-out test split (``build/dataset/test``,
   never the validation split that set the threshold): image AUROC and F1, computed the way
   anomalib users expect. When the data has no defect images, the test split is anomalib's
   synthetic anomalies on held-out normals, and every output says so (``test_set: synthetic``).
2. Export with anomalib's ``to_onnx`` (fixed ``[1,3,S,S]``), then score every test image through
   *both* the torch module and ONNX Runtime, fed exactly like serving feeds the Lambda
   (:func:`serving.preprocess.model_input`: bit-depth rule, ``data.resize`` policy to SxS).
   ``onnx_max_abs_diff`` is the largest ``pred_score``
   gap; above ``evaluate.onnx_tolerance`` the stage fails, because the registry would otherwise
   promote a model that does not behave like the one that was measured.
   The same pass computes ``pixel_AUROC`` and ``pixel_AUPRO`` (MVTec AU-PRO, FPR <= 0.3) from the
   raw anomaly maps against the masks, in bounded memory (:mod:`experiments.metrics`), when the
   scored images have masks (real masks, or the synthetic anomalies' own masks).
3. ROC/PR curves and heat maps from the ONNX scores, i.e. from what is actually deployed.
4. Latencies (median, batch 1, one thread each, after warm-up) and the ONNX file size.
5. One MLflow run per model: params, metrics, curves, heat maps and the ONNX model (with its
   signature); ``summary.json`` points the registry at that ``model_uri``.

Outputs in ``build/eval/<model>/``: ``metrics.json``, ``summary.json``, ``plots/{roc,pr}.csv``,
``heatmaps/*.png``, ``onnx/model.onnx`` (see docs/contracts.md section 3).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.backbones import BackboneError
from experiments.config import ParamsError, load_params
from experiments.datamodule import DatasetLayoutError, build_datamodule, has_masks, is_synthetic, split_record
from experiments.export import export_onnx, file_size_mb, median_latency_ms, ort_session, run_ort
from experiments.metrics import StreamingPixelMetrics
from experiments.models import build_model, model_params, resize_policy
from experiments.plots import curve_figure, roc_pr, save_heatmap, write_curve
from experiments.runtime import peak_rss_mb, quiet_third_party_warnings, seed_everything, stage_main
from experiments.train import CHECKPOINT_NAME, make_engine

REPO_ROOT = Path(__file__).resolve().parent.parent
LOGGED_PARAM_SECTIONS = ("seed", "data", "backbone", "train", "evaluate")


class OnnxMismatchError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model's scores."""


def _number(value: object, kind: type | tuple[type, ...], minimum: float, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        raise ParamsError(f"params.yaml: evaluate.{key} must be a number >= {minimum}, got {value!r}")


def evaluate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Validated ``evaluate`` section with defaults filled in."""
    cfg = dict(params.get("evaluate") or {})
    settings = {
        "n_heatmaps": cfg.get("n_heatmaps", 6),
        "latency_repeats": cfg.get("latency_repeats", 20),
        "onnx_tolerance": cfg.get("onnx_tolerance", 1e-3),
    }
    _number(settings["n_heatmaps"], int, 0, "n_heatmaps")
    _number(settings["latency_repeats"], int, 1, "latency_repeats")
    _number(settings["onnx_tolerance"], (int, float), 1e-12, "onnx_tolerance")
    settings["onnx_tolerance"] = float(settings["onnx_tolerance"])
    return settings


def load_serving_input(path: Path, size: int, policy: str = "letterbox") -> tuple[np.ndarray, np.ndarray]:
    """Read an image the way serving does; return ``(float32[1,3,S,S] in [0,1], uint8 HxW grey view)``."""
    from PIL import Image

    from serving.preprocess import fit_image, to_model_input

    with Image.open(path) as im:
        rgb8 = fit_image(im, size, policy)
    return to_model_input(rgb8), np.asarray(Image.fromarray(rgb8).convert("L"))


def _test_samples(datamodule: Any) -> list[tuple[Path, int, Path | None]]:
    """(image path, label, mask path or None) of the test split anomalib evaluated, sorted by path."""
    frame = datamodule.test_data.samples
    masks = frame.mask_path if "mask_path" in frame else [None] * len(frame)
    out = []
    for path, label, mask in zip(frame.image_path, frame.label_index, masks, strict=True):
        mask_path = Path(mask) if isinstance(mask, str) and mask else None
        out.append((Path(path), int(label), mask_path))
    return sorted(out, key=lambda s: (s[0], s[1]))


def write_scores(
    path: Path, samples: list[tuple[Path, int, Path | None]], scores: list[float], dataset: Path
) -> None:
    """``image,label,score`` per scored test image (paths relative to ``dataset`` when inside it)."""
    rows, root = ["image,label,score"], dataset.resolve()
    for (image, label, _mask), score in zip(samples, scores, strict=True):
        path_ = image.resolve()
        rel = path_.relative_to(root).as_posix() if path_.is_relative_to(root) else path_.as_posix()
        rows.append(f"{rel},{label},{score:.9g}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def load_mask(path: Path | None, size: int) -> np.ndarray:
    """A ground-truth mask at the model's input size (nearest neighbour), bool; all False for ``None``."""
    from PIL import Image

    if path is None:
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0


def _heatmap_picks(samples: list[tuple[Path, int, Path | None]], n: int) -> list[int]:
    """Indices of the first ``ceil(n/2)`` defective and ``floor(n/2)`` normal test images."""
    defects = [i for i, (_, label, _) in enumerate(samples) if label == 1]
    normals = [i for i, (_, label, _) in enumerate(samples) if label == 0]
    return defects[: math.ceil(n / 2)] + normals[: n // 2]


def _map2d(anomaly_map: np.ndarray) -> np.ndarray:
    return np.asarray(anomaly_map, dtype=np.float32).reshape(anomaly_map.shape[-2:])


def compare_and_score(
    model: Any,
    onnx_path: Path,
    samples: list[tuple[Path, int, Path | None]],
    size: int,
    heatmap_dir: Path,
    n_heatmaps: int,
    model_name: str,
    pixel_metrics: StreamingPixelMetrics | None = None,
    policy: str = "letterbox",
) -> dict[str, Any]:
    """Score every test image with torch and ONNX Runtime; return scores and the largest gaps.

    With ``pixel_metrics``, each image's raw (pre-normalisation) anomaly map and its mask are added
    to it: raw maps, because the normalised ones are clipped to [0, 1] and ties there would bias
    pixel AUROC / AU-PRO. One image at a time, so memory does not grow with the test set.
    """
    import torch

    session = ort_session(onnx_path)
    picks = set(_heatmap_picks(samples, n_heatmaps))
    ort_scores: list[float] = []
    score_diff = map_diff = 0.0
    first_input: np.ndarray | None = None
    model.eval()
    with torch.inference_mode():
        for index, (path, label, mask_path) in enumerate(samples):
            x, grey = load_serving_input(path, size, policy)
            first_input = x if first_input is None else first_input
            raw = model.model(model.pre_processor(torch.from_numpy(x)))  # = model(x) before post-processing
            torch_out = model.post_processor(raw)
            if pixel_metrics is not None:
                pixel_metrics.update(
                    _map2d(raw.anomaly_map.detach().cpu().numpy()), load_mask(mask_path, size)
                )
            ort_out = run_ort(session, x)
            torch_score = torch_out.pred_score.detach().cpu().numpy().reshape(-1)
            ort_score = np.asarray(ort_out["pred_score"]).reshape(-1)
            score_diff = max(score_diff, float(np.abs(torch_score - ort_score).max()))
            torch_map = _map2d(torch_out.anomaly_map.detach().cpu().numpy())
            ort_map = _map2d(ort_out["anomaly_map"])
            map_diff = max(map_diff, float(np.abs(torch_map - ort_map).max()))
            ort_scores.append(float(ort_score[0]))
            if index in picks:
                verdict = "anomalous" if ort_score[0] >= 0.5 else "normal"
                title = f"{model_name} | {path.name} | truth: {'defect' if label else 'good'} | "
                title += f"score {ort_score[0]:.3f} -> {verdict}"
                kind = "defect" if label else "good"
                save_heatmap(heatmap_dir / f"{kind}_{path.stem}.png", grey, ort_map, title)
    assert first_input is not None
    return {
        "labels": [label for _, label, _ in samples],
        "scores": ort_scores,
        "onnx_max_abs_diff": score_diff,
        "onnx_map_max_abs_diff": map_diff,
        "session": session,
        "example_input": first_input,
    }


def measure_latency(model: Any, session: Any, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """Median batch-1 latency (ms) of ONNX Runtime and of the torch module, both on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ort_ms = median_latency_ms(lambda: run_ort(session, x), repeats)
        tensor = torch.from_numpy(x)
        with torch.inference_mode():
            torch_ms = median_latency_ms(lambda: model(tensor), repeats)
    finally:
        torch.set_num_threads(threads)
    return ort_ms, torch_ms


def log_to_mlflow(
    model_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    out_dir: Path,
    onnx_path: Path,
    example_input: np.ndarray,
    example_output: dict[str, np.ndarray],
    curves: dict[str, np.ndarray],
    train_record: dict[str, Any],
) -> tuple[str, str, dict[str, str]]:
    """Log one run for this model; return ``(run_id, model_uri, tags)``."""
    import importlib.metadata

    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    from experiments import tracking

    experiment_id = tracking.get_or_create_experiment()
    tags = tracking.run_tags(model_name, params, f"evaluate@{model_name}")
    # "synthetic": metrics are on anomalib's synthetic anomalies (no real defect images yet)
    tags["test_set"] = "synthetic" if metrics.get("test_synthetic") else "real"
    tags["device"] = str(train_record.get("device", "unknown"))  # what train.accelerator resolved to
    logged = {key: params.get(key) for key in LOGGED_PARAM_SECTIONS} | {
        "model": model_params(model_name, params)
    }
    with mlflow.start_run(experiment_id=experiment_id, run_name=model_name, tags=tags) as run:
        mlflow.log_params(tracking.flatten(logged) | {"test_set": tags["test_set"]})
        tracking.log_data_input(params)  # the DVC hash of data/ in the UI's Dataset column
        mlflow.log_metrics(metrics)
        mlflow.log_dict(train_record, "train/train.json")
        mlflow.log_artifacts(str(out_dir / "plots"), artifact_path="plots")
        mlflow.log_artifacts(str(out_dir / "heatmaps"), artifact_path="heatmaps")
        mlflow.log_artifact(str(out_dir / "metrics.json"))
        for name, (x, y) in {"roc": ("fpr", "tpr"), "pr": ("recall", "precision")}.items():
            figure = curve_figure(curves[x], curves[y], x, y, f"{model_name} {name.upper()}")
            mlflow.log_figure(figure, f"plots/{name}.png")
            figure.clf()
        signature = infer_signature(example_input, example_output)
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            signature=signature,
            save_as_external_data=False,  # one self-contained model.onnx for the registry/serving
            pip_requirements=[
                f"onnxruntime=={importlib.metadata.version('onnxruntime')}",
                f"onnx=={importlib.metadata.version('onnx')}",
            ],
        )
        return run.info.run_id, info.model_uri, tags


def evaluate(
    model_name: str,
    params: dict[str, Any],
    dataset: Path,
    models_dir: Path,
    out_dir: Path,
    use_mlflow: bool = True,
    work_dir: Path = REPO_ROOT / "build" / "engine",
) -> dict[str, Any]:
    """Run the whole evaluation for one model; return ``summary.json``'s content."""
    settings = evaluate_params(params)
    model_params(model_name, params)
    ckpt = models_dir / model_name / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt} not found; run the train stage first (dvc repro train@{model_name})")
    size = int(params["data"]["image_size"])
    policy = resize_policy(params)

    seed_everything(int(params["seed"]))
    quiet_third_party_warnings()
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "plots").mkdir(parents=True)
    (out_dir / "heatmaps").mkdir(parents=True)

    model = build_model(model_name, params)
    datamodule = build_datamodule(params, dataset)
    synthetic = is_synthetic(dataset)
    engine = make_engine(params, model_name, work_dir / f"{model_name}-test")
    start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    test_time = time.perf_counter() - start
    anomalib_metrics = {k: float(v) for k, v in results[0].items()}
    model.cpu()  # the test may have run on a GPU; export, parity and latency are CPU figures

    onnx_path = export_onnx(model, out_dir / "onnx", size)
    samples = _test_samples(datamodule)
    post = model.post_processor
    pixel_metrics = (
        StreamingPixelMetrics(float(post.pixel_min), float(post.pixel_max)) if has_masks(dataset) else None
    )
    scored = compare_and_score(
        model,
        onnx_path,
        samples,
        size,
        out_dir / "heatmaps",
        settings["n_heatmaps"],
        model_name,
        pixel_metrics,
        policy,
    )
    curves = roc_pr(scored["labels"], scored["scores"])
    # Per-image ONNX scores: benchmarks/accuracy.py bootstraps confidence intervals from them.
    write_scores(out_dir / "scores.csv", samples, scored["scores"], dataset)
    write_curve(out_dir / "plots" / "roc.csv", "fpr", curves["fpr"], "tpr", curves["tpr"])
    write_curve(out_dir / "plots" / "pr.csv", "recall", curves["recall"], "precision", curves["precision"])
    ort_ms, torch_ms = measure_latency(
        model, scored["session"], scored["example_input"], settings["latency_repeats"]
    )

    from sklearn.metrics import roc_auc_score

    train_json = models_dir / model_name / "train.json"
    train_record = json.loads(train_json.read_text()) if train_json.is_file() else {}
    if pixel_metrics is not None:
        anomalib_metrics |= pixel_metrics.compute()
    metrics: dict[str, float] = {
        **{k: round(v, 6) for k, v in sorted(anomalib_metrics.items())},
        # 1: scored on anomalib's synthetic anomalies (data/ has no defect images), not real defects
        "test_synthetic": 1.0 if synthetic else 0.0,
        "onnx_image_AUROC": round(float(roc_auc_score(scored["labels"], scored["scores"])), 6),
        "latency_ms": round(ort_ms, 3),
        "torch_latency_ms": round(torch_ms, 3),
        "model_size_mb": round(file_size_mb(onnx_path), 3),
        "onnx_max_abs_diff": float(f"{scored['onnx_max_abs_diff']:.3g}"),
        "onnx_map_max_abs_diff": float(f"{scored['onnx_map_max_abs_diff']:.3g}"),
        "test_time_s": round(test_time, 3),
        "train_time_s": float(train_record.get("train_time_s", float("nan"))),
        "train_peak_rss_mb": float(train_record.get("peak_rss_mb", float("nan"))),
        "eval_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    if metrics["onnx_max_abs_diff"] > settings["onnx_tolerance"]:
        raise OnnxMismatchError(
            f"{model_name}: ONNX Runtime pred_score differs from torch by {metrics['onnx_max_abs_diff']:.3g} "
            f"(> evaluate.onnx_tolerance = {settings['onnx_tolerance']}); not logging this model"
        )

    summary: dict[str, Any] = {
        "model": model_name,
        "run_id": None,
        "model_uri": None,
        "metrics": metrics,
        "onnx_path": str(
            onnx_path.relative_to(REPO_ROOT) if onnx_path.is_relative_to(REPO_ROOT) else onnx_path
        ),
        "image_size": size,
        "resize": policy,
        "threshold": float(post.normalized_image_threshold),
        "raw_threshold": float(post.image_threshold),
        "input_name": scored["session"].get_inputs()[0].name,
        "outputs": [o.name for o in scored["session"].get_outputs()],
        "n_test_images": len(samples),
        "test_set": "synthetic" if synthetic else "real",
        # threshold policy as applied in train (method, why, counts), and which images set it / were scored
        "threshold_policy": train_record.get("threshold"),
        "splits": split_record(datamodule, dataset),
        "device": train_record.get("device", "unknown"),
    }
    from experiments import tracking

    summary["data_version"] = tracking.data_version()
    summary["git_commit"] = tracking.git_commit()
    if use_mlflow:
        example_output = run_ort(scored["session"], scored["example_input"])
        run_id, model_uri, tags = log_to_mlflow(
            model_name,
            params,
            metrics,
            out_dir,
            onnx_path,
            scored["example_input"],
            example_output,
            curves,
            train_record,
        )
        summary |= {"run_id": run_id, "model_uri": model_uri, "pipeline_id": tags["pipeline_id"]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@stage_main("evaluate", OnnxMismatchError, DatasetLayoutError, BackboneError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a key of params.yaml: models")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--dataset", type=Path, default=REPO_ROOT / "build" / "dataset")
    parser.add_argument("--models", type=Path, default=REPO_ROOT / "build" / "models")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "eval")
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging (tests, quick checks)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    summary = evaluate(
        args.model, params, args.dataset, args.models, args.out / args.model, use_mlflow=not args.no_mlflow
    )
    print(json.dumps(summary["metrics"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
