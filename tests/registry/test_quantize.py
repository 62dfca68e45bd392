"""INT8 quantization of the champion: the graph it makes, the accuracy gate, the metadata block, serving it.

Real ONNX Runtime quantization of the tiny genuine anomalib PaDiM export (``tools/tiny_model.py``),
scored on real ELPV cells; the gate's refusals are constructed from known AUROC figures.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config.params import ParamsError
from core.contract import ModelMetadataError, load_metadata
from core.files import sha256_file
from core.scoring import PRECISION_ENV, Scorer, ScoringError, create_session, model_precision
from registry.quantize import (
    INT8_FILE,
    QuantizeSettings,
    SplitScores,
    apply_gate,
    load_input,
    quantize_and_gate,
    quantize_model,
    separable_blur,
    validation_samples,
)

SIZE = (64, 64)
RESIZE = "stretch"  # what the tiny model's metadata says


def _save_rgb(paths: list[Path], folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB").save(folder / f"{p.stem}.png")


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare's layout with a validation split: 10 normal + 6 defective ELPV cells, masks for the defects."""
    from PIL import Image

    from tools.tiny_model import elpv_samples

    root = tmp_path_factory.mktemp("val-dataset")
    normal, defect = elpv_samples(n_normal=12, n_defect=6)
    _save_rgb(normal[:10], root / "val" / "good")
    _save_rgb(defect, root / "val" / "crack")
    _save_rgb(normal[10:], root / "test" / "good")
    _save_rgb(defect[:2], root / "test" / "crack")
    masks = root / "ground_truth" / "val" / "crack"
    masks.mkdir(parents=True)
    for image in sorted((root / "val" / "crack").iterdir()):
        mask = np.zeros((300, 300), np.uint8)
        mask[100:200, 120:220] = 255
        Image.fromarray(mask).save(masks / image.name)
    return root


@pytest.fixture(scope="module")
def int8_model(serving_model_dir: Path, val_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized once for the module (calibrated on the validation normals)."""
    normals = [s for s in validation_samples(val_dataset) if s.label == 0]
    out = tmp_path_factory.mktemp("int8") / INT8_FILE
    return quantize_model(
        serving_model_dir / "model.onnx", out, [load_input(s.path, SIZE, RESIZE) for s in normals]
    )


# ------------------------------------------------------------------------------------------ settings
def test_settings_default_to_disabled_and_refuse_bad_values() -> None:
    assert QuantizeSettings.from_params({}) == QuantizeSettings(enabled=False)
    settings = QuantizeSettings.from_params({"quantize": {"enabled": True, "calibration_images": 8}})
    assert settings.enabled and settings.calibration_images == 8 and settings.max_image_auroc_drop == 0.005
    for bad, key in (
        ({"enabled": "yes"}, "quantize.enabled"),
        ({"max_image_auroc_drop": 1.5}, "quantize.max_image_auroc_drop"),
        ({"max_pixel_auroc_drop": True}, "quantize.max_pixel_auroc_drop"),
        ({"calibration_images": 0}, "quantize.calibration_images"),
        ({"calibrate": 3}, "unknown key"),
    ):
        with pytest.raises(ParamsError, match=key):
            QuantizeSettings.from_params({"quantize": bad})


def test_repo_params_enable_the_gate_at_the_issue_thresholds() -> None:
    from config.params import load_params
    from config.paths import REPO_ROOT

    settings = QuantizeSettings.from_params(load_params(REPO_ROOT / "params.yaml"))
    assert settings.enabled
    assert (settings.max_image_auroc_drop, settings.max_pixel_auroc_drop) == (0.005, 0.01)


# --------------------------------------------------------------------------------------------- graph
def test_quantization_produces_a_valid_int8_onnx(serving_model_dir: Path, int8_model: Path) -> None:
    import onnx

    model = onnx.load(str(int8_model))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8_weights = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 5, "the backbone's conv weights should be stored as int8"
    fp32_session = create_session(serving_model_dir / "model.onnx")
    session = create_session(int8_model)
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        (i.name, i.shape, i.type) for i in fp32_session.get_inputs()
    ]
    assert {o.name for o in session.get_outputs()} >= {"pred_score", "anomaly_map"}
    assert int8_model.stat().st_size < (serving_model_dir / "model.onnx").stat().st_size


def test_separable_blur_rewrite_gives_the_same_outputs(serving_model_dir: Path, tmp_path: Path) -> None:
    """The anomaly-map blur becomes two 1-D convolutions and the model's outputs do not change."""
    import onnx

    model = onnx.load(str(serving_model_dir / "model.onnx"))
    assert separable_blur(model) == 1
    sizes = {tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 4 and i.dims[0] == 1}
    assert any(d[2] > 1 and d[3] == 1 for d in sizes) and any(d[2] == 1 and d[3] > 1 for d in sizes)
    assert not any(d[2] > 1 and d[3] > 1 for d in sizes), "the KxK blur kernel is still there"
    onnx.save(model, str(tmp_path / "separable.onnx"))
    before, after = (
        create_session(serving_model_dir / "model.onnx"),
        create_session(tmp_path / "separable.onnx"),
    )
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.random((1, 3, *SIZE), dtype=np.float32)
        want = before.run(["pred_score", "anomaly_map"], {"input": x})
        got = after.run(["pred_score", "anomaly_map"], {"input": x})
        for w, g in zip(want, got, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)


# ---------------------------------------------------------------------------------------------- gate
def _scores(image: float | None, pixel: float | None = None) -> SplitScores:
    return SplitScores(scores=[], image_auroc=image, pixel_auroc=pixel)


def test_gate_accepts_a_drop_within_the_limits() -> None:
    settings = QuantizeSettings(enabled=True)
    result = apply_gate(_scores(0.900, 0.950), _scores(0.896, 0.941), settings)
    assert result.passed and result.why.startswith("within the gate")
    assert (result.val_image_AUROC_fp32, result.val_image_AUROC_int8) == (0.900, 0.896)
    assert apply_gate(_scores(0.90), _scores(0.93), settings).passed  # better is fine


def test_gate_refuses_a_drop_beyond_the_limits() -> None:
    settings = QuantizeSettings(enabled=True)
    image = apply_gate(_scores(0.900, 0.950), _scores(0.894, 0.950), settings)
    assert not image.passed and "image AUROC drop too large" in image.why and "drop +0.0060" in image.why
    pixel = apply_gate(_scores(0.900, 0.950), _scores(0.900, 0.939), settings)
    assert not pixel.passed and "pixel AUROC drop too large" in pixel.why
    assert pixel.val_pixel_AUROC_int8 == 0.939
    unmeasurable = apply_gate(_scores(None), _scores(None), settings)
    assert not unmeasurable.passed and "no defect image" in unmeasurable.why


def test_quantize_and_gate_measures_image_and_pixel_auroc(
    serving_model_dir: Path, val_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / INT8_FILE
    settings = QuantizeSettings(enabled=True, calibration_images=4)
    block = quantize_and_gate(serving_model_dir / "model.onnx", out, val_dataset, SIZE, RESIZE, settings)
    assert block["n_val_images"] == 16 and block["n_calibration_images"] == 4
    assert 0.0 <= block["val_decision_agreement"] <= 1.0 and block["val_max_abs_score_diff"] >= 0.0
    for key in (
        "val_image_AUROC_fp32",
        "val_image_AUROC_int8",
        "val_pixel_AUROC_fp32",
        "val_pixel_AUROC_int8",
    ):
        assert 0.0 <= block[key] <= 1.0, key
    drop_ok = block["val_image_AUROC_fp32"] - block["val_image_AUROC_int8"] <= 0.005
    pixel_ok = block["val_pixel_AUROC_fp32"] - block["val_pixel_AUROC_int8"] <= 0.01
    assert block["passed_gate"] == (drop_ok and pixel_ok)
    assert out.is_file() == block["passed_gate"]


def test_refused_int8_model_is_deleted(serving_model_dir: Path, val_dataset: Path, tmp_path: Path) -> None:
    """Normal-only validation: the drop cannot be measured, so the gate refuses and no file is left."""
    dataset = tmp_path / "normal-only"
    shutil.copytree(val_dataset / "val" / "good", dataset / "val" / "good")
    out = tmp_path / INT8_FILE
    block = quantize_and_gate(
        serving_model_dir / "model.onnx", out, dataset, SIZE, RESIZE, QuantizeSettings(enabled=True)
    )
    assert not block["passed_gate"] and "no defect image" in block["why"]
    assert block["val_image_AUROC_fp32"] is None and not out.exists()


# ------------------------------------------------------------------------------------------ metadata
@pytest.fixture
def model_dir_with_int8(serving_model_dir: Path, int8_model: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the tiny serving folder with the INT8 file and a passing ``int8`` block."""
    folder = tmp_path / "model"
    shutil.copytree(serving_model_dir, folder)
    shutil.copyfile(int8_model, folder / INT8_FILE)
    _edit_int8(
        folder,
        {
            "model_file": INT8_FILE,
            "model_sha256": sha256_file(folder / INT8_FILE),
            "passed_gate": True,
            "why": "within the gate",
            "val_image_AUROC_fp32": 0.9,
            "val_image_AUROC_int8": 0.899,
            "val_pixel_AUROC_fp32": None,
            "val_pixel_AUROC_int8": None,
        },
    )
    yield folder


def _edit_int8(folder: Path, block: dict[str, Any] | None) -> None:
    meta_path = folder / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["int8"] = block
    meta_path.write_text(json.dumps(meta))


def test_metadata_reads_the_int8_block(model_dir_with_int8: Path) -> None:
    meta = load_metadata(model_dir_with_int8)
    assert meta.int8 is not None and meta.int8.passed_gate
    assert meta.int8_path == model_dir_with_int8 / INT8_FILE


def test_metadata_without_int8_block_still_loads(serving_model_dir: Path) -> None:
    meta = load_metadata(serving_model_dir)
    assert meta.int8 is None and meta.int8_path is None


def test_metadata_refuses_an_int8_file_that_does_not_match_its_sha(model_dir_with_int8: Path) -> None:
    with (model_dir_with_int8 / INT8_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(
        ModelMetadataError, match=r"model\.int8\.onnx: sha256 .* does not match int8\.model_sha256"
    ):
        load_metadata(model_dir_with_int8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_sha256": "abc"}, "int8: model_sha256 must be 64 hex"),
        ({"model_file": "../model.int8.onnx"}, "int8: model_file must be a relative path"),
        ({"model_file": "model.onnx"}, "must differ from the fp32 model_file"),
        ({"passed_gate": False}, "model_file is set but passed_gate is false"),
        ({"passed_gate": "yes"}, "passed_gate"),
        ({"val_image_AUROC_int8": "high"}, "val_image_AUROC_int8 must be a finite number or null"),
        ({"why": None}, "why"),
    ],
)
def test_metadata_refuses_a_malformed_int8_block(
    model_dir_with_int8: Path, change: dict[str, Any], message: str
) -> None:
    block = json.loads((model_dir_with_int8 / "metadata.json").read_text())["int8"] | change
    _edit_int8(model_dir_with_int8, block)
    with pytest.raises(ModelMetadataError, match=message):
        load_metadata(model_dir_with_int8)


def test_metadata_refuses_a_missing_int8_file(model_dir_with_int8: Path) -> None:
    (model_dir_with_int8 / INT8_FILE).unlink()
    with pytest.raises(ModelMetadataError, match=r"int8\.model_file 'model\.int8\.onnx' not found"):
        load_metadata(model_dir_with_int8)


# ------------------------------------------------------------------------------------------- serving
def test_model_precision_is_parsed_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRECISION_ENV, raising=False)
    assert model_precision() == "fp32"
    monkeypatch.setenv(PRECISION_ENV, " INT8 ")
    assert model_precision() == "int8"
    assert model_precision("fp32") == "fp32"  # an explicit argument wins over the environment
    monkeypatch.setenv(PRECISION_ENV, "int4")
    with pytest.raises(ScoringError, match="MODEL_PRECISION='int4': must be one of fp32, int8"):
        model_precision()


def test_scorer_serves_int8_close_to_fp32(
    model_dir_with_int8: Path, val_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PRECISION_ENV, "int8")
    int8 = Scorer.from_dir(model_dir_with_int8, intra_op_threads=1)
    fp32 = Scorer.from_dir(model_dir_with_int8, intra_op_threads=1, precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    assert int8.model_sha256 == sha256_file(model_dir_with_int8 / INT8_FILE)
    assert fp32.model_sha256 == sha256_file(model_dir_with_int8 / "model.onnx")
    images = [s.path for s in validation_samples(val_dataset)]
    gaps = []
    for path in images:
        a, b = fp32.score(path.read_bytes()), int8.score(path.read_bytes())
        gaps.append(abs(a.score - b.score))
        assert b.anomaly_map.shape == a.anomaly_map.shape
        assert float(np.abs(a.anomaly_map - b.anomaly_map).max()) < 0.1
    assert max(gaps) < 0.05, f"int8 pred_score differs from fp32 by up to {max(gaps):.3f}"
    assert any(g > 0 for g in gaps), "the int8 session should not be the fp32 model"


def test_scorer_falls_back_to_fp32_when_there_is_no_int8(
    serving_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="core.scoring"):
        scorer = Scorer.from_dir(serving_model_dir, intra_op_threads=1, precision="int8")
    assert scorer.precision == "fp32"
    assert "int8 requested but not available (metadata.json has no int8 block)" in caplog.text
