"""End-to-end: the real `dvc repro` on a small real subset of the embedded data.

The run is the session's shared one (``tests/pipeline_run.py``: a git+DVC copy of this repo with a
small params set, few images, 128 px, one epoch, so the whole pipeline runs in minutes on 2 CPUs,
tracked by the team's MLflow server), so it is trained once for these tests and the tracking-server
ones. Every stage is the real one: prepare → train@* → evaluate@* → select → promote. Tests that
change a pipeline (params edit, forced rerun, ``dvc exp run``) work on ``scratch_pipeline``, a copy
of the finished run, so the shared run stays as `dvc repro` left it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_run import DVC, Pipeline
from tests.pipeline_run import run as _run

pytestmark = pytest.mark.slow


def _metrics(work: Path) -> dict[str, dict]:
    params = yaml.safe_load((work / "params.yaml").read_text())
    return {
        name: json.loads((work / "build" / "eval" / name / "metrics.json").read_text())
        for name in params["models"]
    }


def test_every_model_has_sane_metrics(shared_pipeline: Pipeline) -> None:
    work = shared_pipeline.work
    metrics = _metrics(work)
    assert len(metrics) >= 4
    for name, m in metrics.items():
        for key in ("image_AUROC", "image_F1Score", "latency_ms", "model_size_mb", "onnx_max_abs_diff"):
            assert key in m, f"{name} lacks {key}"
        assert 0.0 <= m["image_AUROC"] <= 1.0
        assert m["onnx_max_abs_diff"] < 1e-3, f"{name}: exported ONNX disagrees with torch"
        assert m["latency_ms"] > 0 and m["model_size_mb"] > 0
    best = max(m["image_AUROC"] for m in metrics.values())
    # A pretrained backbone on real defective solar cells must do much better than chance.
    assert best > 0.7, metrics


def test_plots_and_heatmaps_written(shared_pipeline: Pipeline) -> None:
    work = shared_pipeline.work
    for name in _metrics(work):
        plots = work / "build" / "eval" / name / "plots"
        assert (plots / "roc.csv").read_text().count("\n") > 2
        assert (plots / "pr.csv").read_text().count("\n") > 2
        assert list((work / "build" / "eval" / name / "heatmaps").glob("*.png"))


def test_champion_registered_and_promoted(shared_pipeline: Pipeline) -> None:
    work, env = shared_pipeline.work, shared_pipeline.env
    meta = json.loads((work / "serving" / "model" / "metadata.json").read_text())
    champion = json.loads((work / "build" / "registry" / "champion.json").read_text())
    assert meta["registry_version"] == str(champion["version"])
    assert meta["run_id"] == champion["run_id"]
    # params.yaml enables the INT8 gate: its figures are recorded whether or not it passed
    int8 = meta["int8"]
    assert isinstance(int8["passed_gate"], bool) and int8["why"]
    assert (work / "serving" / "model" / "model.int8.onnx").is_file() == int8["passed_gate"]
    code = (
        "import mlflow, json, sys;"
        "c = mlflow.MlflowClient();"
        f"v = c.get_model_version_by_alias({meta['registered_model']!r}, 'champion');"
        "print(json.dumps({'version': str(v.version), 'run_id': v.run_id}))"
    )
    out = _run([sys.executable, "-c", code], work, env).stdout.strip().splitlines()[-1]
    assert json.loads(out) == {"version": str(champion["version"]), "run_id": champion["run_id"]}
    # The promoted model scores a real test image through the torch-free serving path.
    from core.scoring import Scorer

    scorer = Scorer.from_dir(work / "serving" / "model")
    image = next((work / "build" / "dataset" / "test" / "defect").glob("*.png"))
    result = scorer.score(image.read_bytes())
    assert 0.0 <= result.score <= 1.0


def test_second_repro_is_a_noop(shared_pipeline: Pipeline) -> None:
    work, env = shared_pipeline.work, shared_pipeline.env
    lock_before = (work / "dvc.lock").read_text()
    out = _run([DVC, "repro"], work, env).stdout
    assert "Running stage" not in out, out
    assert (work / "dvc.lock").read_text() == lock_before


def test_changing_one_model_reruns_only_that_model(scratch_pipeline: Pipeline) -> None:
    work, env = scratch_pipeline.work, scratch_pipeline.env
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["models"]["padim"]["n_features"] = int(params["models"]["padim"]["n_features"]) - 8
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = _run([DVC, "status", "--json"], work, env).stdout
    finally:
        _run(["git", "checkout", "--", "params.yaml"], work, env)
    changed = set(json.loads(status or "{}"))
    assert "train@padim" in changed
    assert not any(s.startswith(("train@", "evaluate@")) and not s.endswith("@padim") for s in changed), (
        changed
    )
    assert "prepare" not in changed


def test_same_data_and_params_give_same_metrics(
    shared_pipeline: Pipeline, scratch_pipeline: Pipeline
) -> None:
    """Train + evaluate of one model rerun in a new process give the shared run's metrics."""
    work, env = scratch_pipeline.work, scratch_pipeline.env
    name = "patchcore"
    before = json.loads((shared_pipeline.work / "build" / "eval" / name / "metrics.json").read_text())
    _run([DVC, "repro", "--force", "--single-item", f"train@{name}", f"evaluate@{name}"], work, env)
    after = json.loads((work / "build" / "eval" / name / "metrics.json").read_text())
    for key in ("image_AUROC", "image_F1Score"):
        assert after[key] == before[key], (key, before[key], after[key])


def test_dvc_exp_run_sweeps_one_param(scratch_pipeline: Pipeline) -> None:
    """`dvc exp run -S` (the README's sweep command) runs and records the changed metric."""
    work, env = scratch_pipeline.work, scratch_pipeline.env
    _run(["git", "checkout", "--", "params.yaml"], work, env)
    _run([DVC, "repro"], work, env)  # back to the committed params first
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "baseline", "--allow-empty"], work, env)
    _run(
        [DVC, "exp", "run", "-n", "dfm-pca-090", "-S", "models.dfm.pca_level=0.9"],
        work,
        env,
    )
    shown = json.loads(_run([DVC, "exp", "show", "--json"], work, env).stdout)
    text = json.dumps(shown)
    assert "dfm-pca-090" in text
    assert "0.9" in text and "image_AUROC" in text
