"""The accuracy benchmark's bootstrap interval on known cases, and its params override."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from benchmarks.accuracy import (
    ALL_IMAGES,
    DEFAULT_SETTINGS,
    bench_params,
    bootstrap_auroc_ci,
    bootstrap_pixel_auroc_ci,
    champions,
    dataset_for_split,
    histogram_auroc,
    load_settings,
)


def test_point_estimate_equals_sklearn_with_ties() -> None:
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.4, 0.4, 0.9, 0.2, 0.3, 0.8]
    auroc, low, high = bootstrap_auroc_ci(labels, scores, resamples=200, seed=1)
    assert auroc == pytest.approx(roc_auc_score(labels, scores))
    assert low <= auroc <= high


def test_perfect_separation_has_a_degenerate_interval() -> None:
    assert bootstrap_auroc_ci([0] * 5 + [1] * 5, list(range(10)), resamples=100) == (1.0, 1.0, 1.0)


def test_interval_covers_the_true_auroc_of_a_binormal_model_with_the_expected_width() -> None:
    """Scores N(0,1) vs N(1,1): true AUROC = Phi(1/sqrt 2) = 0.760; width ~ 2 * 1.96 * Hanley-McNeil SE."""
    rng = np.random.default_rng(123)
    n = 400
    labels = np.r_[np.zeros(n), np.ones(n)].astype(int)
    scores = np.r_[rng.normal(0, 1, n), rng.normal(1, 1, n)]
    truth = norm.cdf(1 / math.sqrt(2))
    auroc, low, high = bootstrap_auroc_ci(labels, scores, resamples=1000, seed=0)
    assert low < truth < high
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    se = math.sqrt((auroc * (1 - auroc) + (n - 1) * (q1 - auroc**2) + (n - 1) * (q2 - auroc**2)) / (n * n))
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.2)
    # Seeded: the same call gives the same interval; a 10x smaller test set a wider one.
    assert bootstrap_auroc_ci(labels, scores, resamples=1000, seed=0) == (auroc, low, high)
    small = np.r_[0:40, n : n + 40]
    _, s_low, s_high = bootstrap_auroc_ci(labels[small], scores[small], resamples=1000, seed=0)
    assert s_high - s_low > 2 * (high - low)


def test_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="at least one normal"):
        bootstrap_auroc_ci([1, 1], [0.2, 0.3])


def test_bench_params_take_every_image_and_apply_overrides(tmp_path: Path) -> None:
    params = bench_params(tmp_path, ["padim"], ["models.padim.n_features=64", "data.image_size=128"])
    assert params["data"]["root"] == str(tmp_path)
    assert {params["data"][k] for k in ("max_train", "max_test_good", "max_test_defect")} == {ALL_IMAGES}
    assert list(params["models"]) == ["padim"] and params["models"]["padim"]["n_features"] == 64
    assert params["data"]["image_size"] == 128
    with pytest.raises(SystemExit, match="unknown model"):
        bench_params(tmp_path, ["nope"], [])


def test_settings_apply_per_model_in_the_run_and_set_wins(tmp_path: Path) -> None:
    settings = {
        "models.padim.n_features": 200,
        "models.patchcore.layers": ["blocks.2"],
        "data.image_size": 320,
    }
    params = bench_params(tmp_path, ["padim"], [], settings)
    assert params["models"]["padim"]["n_features"] == 200 and params["data"]["image_size"] == 320
    assert list(params["models"]) == ["padim"]  # patchcore's setting did not add patchcore to the run
    params = bench_params(tmp_path, ["padim", "patchcore"], ["models.padim.n_features=64"], settings)
    assert params["models"]["padim"]["n_features"] == 64  # --set comes after the settings
    assert params["models"]["patchcore"]["layers"] == ["blocks.2"]
    assert params["models"]["patchcore"]["num_neighbors"] == 9  # the rest of params.yaml's entry kept


def test_the_committed_settings_name_real_params(tmp_path: Path) -> None:
    """Every key of accuracy_settings.yaml exists in params.yaml: a renamed knob fails here, not silently."""
    import yaml

    defaults = yaml.safe_load((DEFAULT_SETTINGS.parents[1] / "params.yaml").read_text())
    settings = load_settings(DEFAULT_SETTINGS)
    assert settings, "the settings file is empty"
    for name, overrides in settings.items():
        for key in overrides:
            node = defaults
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: {key} is not in params.yaml"
                node = node[part]
        bench_params(tmp_path, list(defaults["models"]), [], overrides)  # and applies cleanly


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mvtec:\n  data.image_size: 320\n", "unknown data set"),
        ("elpv: [data.image_size]\n", "must map each data set"),
        ("elpv: {a: [\n", "cannot read settings"),
    ],
)
def test_bad_settings_file_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message) as caught:
        load_settings(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_pixel_auroc_from_histograms_equals_sklearn_on_the_binned_pixels() -> None:
    rng = np.random.default_rng(5)
    bins, n_images = 50, 12
    labels = [0] * 6 + [1] * 6
    pos, neg = np.zeros((n_images, bins)), np.zeros((n_images, bins))
    all_scores, all_truth = [], []
    for i, label in enumerate(labels):
        truth = (rng.random(400) < 0.1) if label else np.zeros(400, dtype=bool)
        binned = np.clip(((rng.random(400) * 0.7 + 0.3 * truth) * bins).astype(int), 0, bins - 1)
        pos[i] = np.bincount(binned[truth], minlength=bins)
        neg[i] = np.bincount(binned[~truth], minlength=bins)
        all_scores += binned.tolist()
        all_truth += truth.tolist()
    auroc, low, high = bootstrap_pixel_auroc_ci(pos, neg, labels, resamples=300, seed=0)
    assert auroc == pytest.approx(roc_auc_score(all_truth, all_scores))
    assert low < auroc < high and high - low < 0.2
    assert histogram_auroc(np.array([0, 0, 3.0]), np.array([2.0, 0, 0])) == 1.0


def test_val_view_scores_the_validation_images_and_never_the_test_ones(tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    files_in = [
        "train/good/a.png",
        "val/good/b.png",
        "val/crack/c.png",
        "test/good/d.png",
        "test/crack/e.png",
    ]
    for rel in [*files_in, "ground_truth/val/crack/c.png", "ground_truth/test/crack/e.png"]:
        (dataset / rel).parent.mkdir(parents=True, exist_ok=True)
        (dataset / rel).write_bytes(rel.encode())
    assert dataset_for_split(tmp_path, "test") == (dataset, tmp_path / "eval")
    view, eval_dir = dataset_for_split(tmp_path, "val")
    assert eval_dir == tmp_path / "eval-val"
    files = sorted(p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file())
    assert "test/crack/c.png" in files and "test/good/b.png" in files
    assert "ground_truth/test/crack/c.png" in files
    assert not [f for f in files if f.endswith(("d.png", "e.png"))]  # the scored test split stays unseen
    assert (view / "test/crack/c.png").read_bytes() == b"val/crack/c.png"


def test_champion_line_applies_the_pipelines_selection_rule(tmp_path: Path) -> None:
    metrics = {
        "padim": {"image_AUROC": 0.95, "latency_ms": 30.0, "model_size_mb": 40.0, "onnx_max_abs_diff": 1e-6},
        "dfm": {"image_AUROC": 0.948, "latency_ms": 9.0, "model_size_mb": 4.0, "onnx_max_abs_diff": 1e-6},
        "stfpm": {"image_AUROC": 0.5, "latency_ms": 5.0, "model_size_mb": 6.0, "onnx_max_abs_diff": 1e-6},
    }
    for model, values in metrics.items():
        (tmp_path / "cookies" / "eval" / model).mkdir(parents=True)
        (tmp_path / "cookies" / "eval" / model / "metrics.json").write_text(json.dumps(values))
    rows = [{"dataset": "cookies", "model": m} for m in metrics]
    (line,) = champions(rows, tmp_path)
    assert line.startswith("cookies: champion dfm")  # tied within tie_tolerance 0.005, faster wins
