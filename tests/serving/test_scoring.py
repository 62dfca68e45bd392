"""Scoring with the real tiny ONNX model, overlays, and metadata validation."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.contract import ModelMetadataError, load_metadata
from core.scoring import Scorer, ScoringError, _to_2d_map, heat_colormap, overlay
from tests.serving.conftest import elpv_image_bytes, image_bytes


def test_score_is_sane_and_deterministic(scorer: Scorer) -> None:
    data = elpv_image_bytes(0)
    first = scorer.score(data)
    second = scorer.score(Image.open(io.BytesIO(data)))
    assert 0.0 <= first.score <= 1.0
    assert first.score == second.score
    assert first.threshold == scorer.metadata.threshold == 0.5
    assert first.is_anomalous == (first.score >= first.threshold)
    assert np.array_equal(first.anomaly_map, second.anomaly_map)
    assert set(first.timings) == {"preprocess", "inference", "postprocess"}


def test_anomaly_map_shape_dtype_range(scorer: Scorer) -> None:
    result = scorer.score(elpv_image_bytes(5))
    spec = scorer.metadata.input
    assert result.anomaly_map.shape == (spec.height, spec.width) == (64, 64)
    assert result.anomaly_map.dtype == np.float32
    assert 0.0 <= float(result.anomaly_map.min()) <= float(result.anomaly_map.max()) <= 1.0


def test_scores_vary_across_images(scorer: Scorer) -> None:
    """Not a quality claim (the fixture is tiny and random): just that the model looks at its input."""
    scores = [scorer.score(elpv_image_bytes(i)).score for i in range(8)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > 1


def test_preprocess_contract(scorer: Scorer) -> None:
    grey = Image.new("L", (300, 200), color=255)
    batch = scorer.preprocess(grey)
    assert batch.shape == (1, 3, 64, 64)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    # the fixture's metadata says letterbox (the default): 300x200 -> 64x43 of white, black bars
    assert scorer.metadata.input.resize == "letterbox"
    assert np.allclose(batch[:, :, 10:53], 1.0)
    assert np.allclose(batch[:, :, :10], 0.0) and np.allclose(batch[:, :, 53:], 0.0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_overlay_is_an_image_of_input_size(scorer: Scorer, fmt: str) -> None:
    data = image_bytes(size=(120, 90), fmt="PNG")
    image = Image.open(io.BytesIO(data))
    result = scorer.score(image)
    encoded = overlay(image, result.anomaly_map, image_format=fmt)  # type: ignore[arg-type]
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == fmt
    assert decoded.size == (120, 90)
    assert decoded.mode == "RGB"
    assert overlay(image, result.anomaly_map, image_format=fmt) == encoded  # deterministic  # type: ignore[arg-type]


def test_overlay_colours_follow_the_map() -> None:
    image = Image.new("RGB", (40, 20), color=(0, 0, 0))
    heat = np.zeros((20, 40), dtype=np.float32)
    heat[:, 20:] = 1.0
    pixels = np.asarray(Image.open(io.BytesIO(overlay(image, heat, alpha=1.0))))
    assert pixels[10, 2, 2] > pixels[10, 2, 0]  # low anomaly: blue
    assert pixels[10, 37, 0] > pixels[10, 37, 2]  # high anomaly: red
    ramp = heat_colormap(np.linspace(0, 1, 5, dtype=np.float32))
    assert ramp.dtype == np.uint8 and ramp.shape == (5, 3)


@pytest.mark.parametrize("shape", [(1, 1, 8, 6), (1, 8, 6), (8, 6)])
def test_anomaly_map_shapes_are_squeezed(shape: tuple[int, ...]) -> None:
    raw = np.full(shape, 2.0, dtype=np.float32)
    out = _to_2d_map(raw, "anomaly_map")
    assert out.shape == (8, 6)
    assert float(out.max()) == 1.0  # clipped to [0, 1]


def test_anomaly_map_bad_shape_is_an_error() -> None:
    with pytest.raises(ScoringError, match=r"\[1,1,H,W\]"):
        _to_2d_map(np.zeros((2, 1, 8, 6), dtype=np.float32), "anomaly_map")


def test_warm_latency_is_small(scorer: Scorer) -> None:
    image = Image.open(io.BytesIO(elpv_image_bytes(1)))
    image.load()
    scorer.score(image)
    timings = []
    for _ in range(10):
        start = time.perf_counter()
        scorer.score(image)
        timings.append((time.perf_counter() - start) * 1000)
    # Generous: 2 shared CPU cores; a 64x64 PaDiM takes a few ms.
    assert float(np.median(timings)) < 250


# -- metadata -----------------------------------------------------------------------------------


@pytest.fixture
def model_copy(serving_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(serving_model_dir, target)
    return target


def _edit(model_dir: Path, **changes: object) -> None:
    path = model_dir / "metadata.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_fixture_metadata_is_valid(serving_model_dir: Path) -> None:
    meta = load_metadata(serving_model_dir)
    assert meta.model_name == "padim"
    assert (meta.input.height, meta.input.width, meta.input.name) == (64, 64, "input")
    assert (meta.score_output, meta.anomaly_map_output) == ("pred_score", "anomaly_map")
    assert meta.model_path.is_file()


def test_sha256_mismatch_is_named(model_copy: Path) -> None:
    with (model_copy / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelMetadataError, match="sha256"):
        load_metadata(model_copy)
    load_metadata(model_copy, verify_sha256=False)  # opt-out still validates the rest


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"schema_version": 99}, "schema_version 99"),
        ({"schema_version": None}, "'schema_version'"),
        ({"model_file": "missing.onnx"}, "missing.onnx"),
        ({"model_file": "../model.onnx"}, "relative path"),
        ({"model_sha256": "xyz"}, "64 hex"),
        ({"threshold": "high"}, "'threshold'"),
        ({"threshold": True}, "'threshold'"),
        ({"outputs": {"score": "pred_score"}}, "'anomaly_map'"),
        ({"input": {"name": "input", "height": 0, "width": 64}}, "'height'"),
        ({"input": {"name": "input", "height": 64, "width": 64, "layout": "NHWC"}}, "NHWC"),
    ],
)
def test_invalid_metadata_is_named(model_copy: Path, changes: dict, fragment: str) -> None:
    _edit(model_copy, **changes)
    with pytest.raises(ModelMetadataError, match=fragment.replace("(", r"\(")):
        load_metadata(model_copy)


def test_missing_and_corrupt_metadata(tmp_path: Path, model_copy: Path) -> None:
    with pytest.raises(ModelMetadataError, match="not found"):
        load_metadata(tmp_path / "nowhere")
    (model_copy / "metadata.json").write_text("{broken")
    with pytest.raises(ModelMetadataError, match="not valid JSON"):
        load_metadata(model_copy)


def test_scorer_rejects_graph_metadata_mismatch(model_copy: Path) -> None:
    meta = json.loads((model_copy / "metadata.json").read_text())
    meta["input"]["height"] = 32
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ScoringError, match="input shape"):
        Scorer.from_dir(model_copy)
    meta["input"]["height"] = 64
    meta["outputs"]["score"] = "score"
    (model_copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ScoringError, match="no output 'score'"):
        Scorer.from_dir(model_copy)


def test_unloadable_model_is_a_scoring_error(model_copy: Path) -> None:
    from core.files import sha256_file

    (model_copy / "model.onnx").write_bytes(b"not onnx")
    _edit(model_copy, model_sha256=sha256_file(model_copy / "model.onnx"))
    with pytest.raises(ScoringError, match="could not load"):
        Scorer.from_dir(model_copy)


def test_one_place_builds_onnx_runtime_sessions() -> None:
    """evaluate's ONNX check, promote's verification, serving and the benchmarks share one session setup.

    A second builder with other options (threads, optimisation level) would let "ONNX matches torch"
    be checked under settings that do not serve.
    """
    repo = Path(__file__).resolve().parents[2]
    builders = sorted(
        path.relative_to(repo).as_posix()
        for package in (
            "core",
            "config",
            "experiments",
            "registry",
            "serving",
            "benchmarks",
            "infra",
            "release",
            "tools",
        )
        for path in (repo / package).rglob("*.py")
        if "InferenceSession(" in path.read_text(encoding="utf-8")
        or "SessionOptions(" in path.read_text(encoding="utf-8")
    )
    assert builders == ["core/scoring.py"], builders
