"""promote with ``quantize.enabled``: the INT8 file, the metadata block and the MLflow figures, end to end.

Same real MLflow sqlite store and tiny anomalib champion as ``test_select_promote.py`` (its fixtures
are reused), plus a validation split so the gate can measure image and pixel AUROC.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from core.contract import load_metadata
from core.scoring import Scorer
from registry.mlflow_client import get_client
from registry.promote import promote
from registry.quantize import INT8_FILE
from tests.registry import test_select_promote as base
from tests.registry.test_select_promote import Store, Workspace

store = base.store  # the module-scoped MLflow sqlite store fixture, shared with the select/promote tests


@pytest.fixture
def workspace(store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> Workspace:
    get_client()  # re-pin the URIs in case another module changed them
    return Workspace(store, tmp_path, f"vi-q-{request.node.name}"[:100])


def _dataset(ws: Workspace, with_defects: bool) -> Path:
    """The store's test images plus a validation split (normals, and defects unless told otherwise)."""
    from tools.tiny_model import elpv_samples

    root = ws.root / "dataset"
    shutil.copytree(ws.dataset / "test", root / "test")
    normal, defect = elpv_samples(n_normal=14, n_defect=10)
    groups = [("val/good", normal[4:14])] + ([("val/crack", defect[4:10])] if with_defects else [])
    from PIL import Image

    for sub, paths in groups:
        (root / sub).mkdir(parents=True)
        for p in paths:
            with Image.open(p) as im:
                im.convert("RGB").save(root / sub / f"{p.stem}.png")
    return root


def _promote(ws: Workspace, dataset: Path, **quantize: Any) -> dict[str, Any]:
    params = ws.params()
    params["quantize"] = {"enabled": True, "calibration_images": 8, **quantize}
    return promote(params, out=ws.serving, eval_dir=ws.eval_dir, dataset=dataset)


def test_promote_writes_int8_model_and_logs_both_figures(workspace: Workspace) -> None:
    ws = workspace
    ws.log_eval("padim", 0.95, latency=10)
    ws.log_eval("patchcore", 0.90, latency=10)
    ws.log_eval("stfpm", 0.80, latency=10)
    record = ws.select()
    dataset = _dataset(ws, with_defects=True)
    # limits wide enough that the tiny model passes whatever its drop: this test is about the wiring
    meta = _promote(ws, dataset, max_image_auroc_drop=0.5, max_pixel_auroc_drop=0.5)
    block = meta["int8"]
    assert block["passed_gate"] and block["model_file"] == INT8_FILE
    assert sorted(p.name for p in ws.serving.iterdir()) == ["metadata.json", INT8_FILE, "model.onnx"]
    loaded = load_metadata(ws.serving)  # the Lambda's cold-start check, including the INT8 sha256
    assert loaded.int8_path == ws.serving / INT8_FILE
    assert json.loads((ws.serving / "metadata.json").read_text())["int8"] == block
    assert block["n_val_images"] == 16 and block["n_calibration_images"] == 8

    metrics = ws.client.get_run(record["run_id"]).data.metrics
    assert metrics["quantize_val_image_AUROC_fp32"] == pytest.approx(block["val_image_AUROC_fp32"])
    assert metrics["quantize_val_image_AUROC_int8"] == pytest.approx(block["val_image_AUROC_int8"])
    assert metrics["quantize_passed_gate"] == 1.0

    image = next((dataset / "test" / "defect").iterdir())
    scorer = Scorer.from_dir(ws.serving, intra_op_threads=1, precision="int8")
    assert scorer.precision == "int8" and 0.0 <= scorer.score(image.read_bytes()).score <= 1.0

    # Same version promoted again: byte-identical, INT8 file included (quantization is deterministic).
    first = {p.name: p.read_bytes() for p in ws.serving.iterdir()}
    _promote(ws, dataset, max_image_auroc_drop=0.5, max_pixel_auroc_drop=0.5)
    assert {p.name: p.read_bytes() for p in ws.serving.iterdir()} == first


def test_promote_records_a_refused_gate_without_an_int8_file(workspace: Workspace) -> None:
    """Normal-only validation: the drop is unmeasurable, so the fp32 champion ships alone, with the reason."""
    ws = workspace
    ws.log_eval("padim", 0.95, latency=10)
    ws.log_eval("patchcore", 0.90, latency=10)
    ws.log_eval("stfpm", 0.80, latency=10)
    record = ws.select()
    meta = _promote(ws, _dataset(ws, with_defects=False))
    block = meta["int8"]
    assert not block["passed_gate"] and block["model_file"] is None and block["model_sha256"] is None
    assert "no defect image" in block["why"]
    assert sorted(p.name for p in ws.serving.iterdir()) == ["metadata.json", "model.onnx"]
    assert load_metadata(ws.serving).int8_path is None
    assert ws.client.get_run(record["run_id"]).data.metrics["quantize_passed_gate"] == 0.0
