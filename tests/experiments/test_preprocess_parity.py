"""Training side and serving side see the same pixels, for every resize policy and for 16-bit input.

For each policy a tiny PaDiM (default offline backbone, 64 px) is trained through the
pipeline's own ``prepare`` -> ``train`` on ELPV cells cut to the awkward shapes of the issue
(100x280 and 620x250 in one set, half of the training cells as 16-bit PNGs), exported with the
pipeline's ``export_onnx``, and then checked end to end:

* training side: ``prepare`` writes the image (``core.preprocess.fit_image`` under the policy),
  anomalib's own dataset reader loads that PNG, the *torch* module scores it;
* serving side: the raw, non-square file goes to :class:`core.scoring.Scorer` (ONNX Runtime)
  with ``metadata.json`` naming the policy.

Same image, same score (within float tolerance), for a policy-specific input: if either side
resized differently (or anomalib's in-graph resize were not an identity) the scores would differ.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from core.preprocess import RESIZE_POLICIES

pytestmark = pytest.mark.slow  # trains models (make test-fast skips them)

SIZE = 64
SHAPES = [(280, 100), (250, 620), (100, 280), (620, 250)]  # (width, height), mixed in one set


def _cut(src: Path, shape: tuple[int, int], dest: Path, sixteen_bit: bool = False) -> Path:
    """An ELPV cell resized to ``shape`` (non-square), saved as 8- or 16-bit grey PNG."""
    with Image.open(src) as im:
        grey = np.asarray(im.convert("L").resize(shape, Image.Resampling.BILINEAR))
    dest.parent.mkdir(parents=True, exist_ok=True)
    pixels = grey.astype(np.uint16) * 257 if sixteen_bit else grey
    Image.fromarray(pixels).save(dest, format="PNG")
    return dest


_CACHE: dict[str, dict] = {}


@pytest.fixture(scope="module", params=RESIZE_POLICIES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """prepare + train + export under ``request.param``; paths and the torch model."""
    return _train(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def letterboxed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default policy's model (shared with ``trained[letterbox]``)."""
    return _train("letterbox", tmp_path_factory)


def _train(policy: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    if policy in _CACHE:
        return _CACHE[policy]
    from experiments.artifacts import CHECKPOINT_NAME
    from experiments.export import export_onnx
    from experiments.models import build_model
    from experiments.prepare import prepare
    from experiments.train import train
    from tools.tiny_model import elpv_samples

    tmp = tmp_path_factory.mktemp(f"parity-{policy}")
    normal, defect = elpv_samples(n_normal=12, n_defect=4)
    data = tmp / "data"
    for i, path in enumerate(normal[:8]):
        _cut(path, SHAPES[i % len(SHAPES)], data / "train/good" / f"n{i:02d}.png", sixteen_bit=i % 2 == 1)
    for i, path in enumerate(normal[8:]):
        _cut(path, SHAPES[i % len(SHAPES)], data / "test/good" / f"g{i:02d}.png")
    for i, path in enumerate(defect):
        _cut(path, SHAPES[i % len(SHAPES)], data / "test/defect" / f"d{i:02d}.png")
    params = {
        "seed": 42,
        "data": {
            "root": str(data),
            "image_size": SIZE,
            "resize": policy,
            "max_train": 8,
            "max_test_good": 4,
            "max_test_defect": 4,
        },
        "backbone": {"name": "tf_efficientnet_lite0"},
        "train": {"batch_size": 4, "num_workers": 0, "accelerator": "auto"},
        "models": {"padim": {"layers": ["blocks.1", "blocks.2"], "n_features": 16}},
    }
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    dataset = tmp / "dataset"
    report = prepare(params_file, dataset, tmp / "report.json")
    assert report["resize"] == policy and report["resized_to"] == SIZE
    record = train("padim", params, dataset, tmp / "models" / "padim", work_dir=tmp / "engine")
    assert record["device"] == "cpu"  # accelerator auto on a machine without a GPU

    import torch

    model = build_model("padim", params)
    state = torch.load(tmp / "models" / "padim" / CHECKPOINT_NAME, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    model.eval()
    onnx_dir = export_onnx(model, tmp / "onnx", SIZE).parent
    _CACHE[policy] = {"tmp": tmp, "model": model, "onnx_dir": onnx_dir, "data": data, "policy": policy}
    return _CACHE[policy]


def _serving_dir(trained: dict) -> Path:
    """``serving/model``-shaped folder of the trained model; its metadata names the policy."""
    policy = trained["policy"]
    from core.contract import SCHEMA_VERSION, input_block
    from core.files import sha256_file

    out = trained["tmp"] / f"serving-{policy}"
    out.mkdir(exist_ok=True)
    shutil.copyfile(trained["onnx_dir"] / "model.onnx", out / "model.onnx")
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "model_file": "model.onnx",
        "model_sha256": sha256_file(out / "model.onnx"),
        "model_name": "padim",
        "registry_version": "1",
        "input": input_block("input", SIZE, SIZE, policy),
        "outputs": {"score": "pred_score", "anomaly_map": "anomaly_map"},
        "threshold": 0.5,
    }
    (out / "metadata.json").write_text(json.dumps(metadata))
    return out


def _torch_score(model, png: Path) -> float:
    """Score a prepared PNG the way training/evaluation read it (anomalib's reader, torch module)."""
    import torch
    from anomalib.data.utils import read_image

    image = read_image(png, as_tensor=True).unsqueeze(0)
    with torch.inference_mode():
        return float(model(image).pred_score.reshape(-1)[0])


def test_training_and_serving_paths_give_the_same_score(trained: dict) -> None:
    from core.scoring import Scorer
    from experiments.prepare import _write_file

    policy = trained["policy"]
    scorer = Scorer.from_dir(_serving_dir(trained), intra_op_threads=1)
    assert scorer.metadata.input.resize == policy
    scores = []
    for raw in sorted((trained["data"] / "test").rglob("*.png")):
        assert Image.open(raw).size != (SIZE, SIZE)
        prepared = trained["tmp"] / f"prepared-{policy}" / raw.name
        _write_file(raw, prepared, SIZE, policy)  # what prepare writes for training
        train_side = _torch_score(trained["model"], prepared)
        serve_side = scorer.score(raw.read_bytes()).score  # the raw non-square bytes
        assert abs(train_side - serve_side) < 1e-4, (raw.name, train_side, serve_side)
        scores.append(serve_side)
    assert len(set(np.round(scores, 6))) > 1  # real, image-dependent scores


def test_policies_feed_different_pixels(letterboxed: dict) -> None:
    from core.preprocess import model_input

    raw = sorted((letterboxed["data"] / "test" / "good").glob("*.png"))[0]
    with Image.open(raw) as im:
        inputs = {p: model_input(im, SIZE, p) for p in RESIZE_POLICIES}
    assert not np.array_equal(inputs["letterbox"], inputs["stretch"])
    assert not np.array_equal(inputs["stretch"], inputs["center_crop"])


def test_sixteen_bit_png_scores_like_its_8bit_twin(letterboxed: dict) -> None:
    """The issue's bug: a normal 16-bit PNG scored 1.0 because convert("RGB") clipped it white."""
    from core.scoring import Scorer, overlay

    scorer = Scorer.from_dir(_serving_dir(letterboxed), intra_op_threads=1)
    raw = sorted((letterboxed["data"] / "test" / "good").glob("*.png"))[0]
    eight = Image.open(raw)
    sixteen_bytes = io.BytesIO()
    Image.fromarray(np.asarray(eight).astype(np.uint16) * 257).save(sixteen_bytes, format="PNG")
    sixteen = Image.open(io.BytesIO(sixteen_bytes.getvalue()))
    assert sixteen.mode in ("I;16", "I")
    s8, s16 = scorer.score(eight), scorer.score(sixteen_bytes.getvalue())
    assert abs(s8.score - s16.score) < 1e-5
    np.testing.assert_allclose(s8.anomaly_map, s16.anomaly_map, atol=1e-5)
    # the old path: clip to 8-bit RGB first -> a white sheet, scored very differently
    clipped = scorer.score(sixteen.convert("RGB"))
    assert abs(clipped.score - s8.score) > 0.1
    # the overlay draws the 16-bit picture, not white
    drawn = np.asarray(
        Image.open(io.BytesIO(overlay(sixteen, s16.anomaly_map, alpha=0.0, resize="letterbox")))
    )
    assert drawn.mean() < 250 and np.abs(drawn[..., 0].astype(int) - np.asarray(eight)).max() <= 1
