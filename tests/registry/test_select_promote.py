"""select → register → promote against a real temporary MLflow sqlite store and real ONNX models.

Why real: the registry semantics under test (alias moves, version reuse, ``models:/name@alias``
downloads, external-data ONNX from the MLflow flavour) live in MLflow itself, so mocks would test
nothing. The champion model is the tiny genuine anomalib PaDiM export from ``tools/tiny_model.py``;
a hand-built ONNX graph with the same input/output names plays a model whose scores differ.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from registry import promote as promote_mod
from registry import select as select_mod
from registry.mlflow_client import get_client
from registry.promote import PromoteError, promote
from registry.rule import NoEligibleCandidateError

SIZE = 64


def _params() -> dict[str, Any]:
    return {
        "models": {"padim": {}, "patchcore": {}, "stfpm": {}},
        "selection": {
            "metric": "image_AUROC",
            "tie_tolerance": 0.005,
            "tie_breaker": "latency_ms",
            "max_latency_ms": 250,
            "max_size_mb": 250,
        },
        "registry": {"model_name": "unused", "alias": "champion"},
        "serving": {"model_dir": "unused"},
    }


def _constant_onnx(path: Path, score: float) -> Path:
    """A real ONNX graph with the anomalib interface whose pred_score is mean(input) + score."""
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])
    out_score = helper.make_tensor_value_info("pred_score", TensorProto.FLOAT, [1])
    out_map = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, SIZE, SIZE])
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
        helper.make_node("Add", ["mean", "offset"], ["pred_score_0"]),
        helper.make_node("Reshape", ["pred_score_0", "shape1"], ["pred_score"]),
        helper.make_node("ReduceMean", ["input", "axis1"], ["anomaly_map"], keepdims=1),
    ]
    inits = [
        helper.make_tensor("offset", TensorProto.FLOAT, [], [score]),
        helper.make_tensor("shape1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, "constant", [inp], [out_score, out_map], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


class Store:
    """One MLflow sqlite store + test images per module; creating the database alone takes seconds.

    Logged runs are cached by their metrics so tests that need "the usual three models" share runs;
    each test still gets its own registered-model name and its own build/ folders, so the registry
    state one test sees is never affected by another.
    """

    def __init__(self, root: Path, tiny_onnx: Path) -> None:
        import mlflow

        self.root = root
        self.tiny_onnx = tiny_onnx
        self.dataset = root / "dataset"
        self.client = get_client()
        self.experiment_id = mlflow.create_experiment(
            "registry-test", artifact_location=(root / "mlartifacts").as_uri()
        )
        self._runs: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._make_dataset()

    def _make_dataset(self) -> None:
        from PIL import Image

        from tools.tiny_model import elpv_samples

        normal, defect = elpv_samples(n_normal=2, n_defect=2)
        for label, paths in (("good", normal), ("defect", defect)):
            target = self.dataset / "test" / label
            target.mkdir(parents=True)
            for p in paths:
                with Image.open(p) as im:
                    im.convert("RGB").save(target / (p.stem + ".png"))

    def log_run(self, model: str, metrics: dict[str, float], onnx_path: Path, fresh: bool) -> tuple[str, str]:
        """Log a run with an ONNX model like evaluate.py does; return ``(run_id, model_uri)``."""
        import mlflow
        import onnx
        import onnxruntime as ort
        from mlflow.models import infer_signature

        key = (model, str(onnx_path), *sorted(metrics.items()))
        if key in self._runs and not fresh:
            return self._runs[key]
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        x = np.zeros((1, 3, SIZE, SIZE), np.float32)
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=model) as run:
            mlflow.log_metrics(metrics)
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name="model", signature=infer_signature(x, outs)
            )
        self._runs[key] = (run.info.run_id, info.model_uri)
        return self._runs[key]


class Workspace:
    """One test's repo-like layout (build/eval, build/registry, serving/model) and registered model."""

    def __init__(self, store: Store, root: Path, model_name: str) -> None:
        self.store = store
        self.client = store.client
        self.root = root
        self.model_name = model_name
        self.eval_dir = root / "build" / "eval"
        self.out_dir = root / "build" / "registry"
        self.dataset = store.dataset
        self.serving = root / "serving" / "model"

    def params(self) -> dict[str, Any]:
        params = _params()
        params["registry"]["model_name"] = self.model_name
        return params

    def log_eval(
        self,
        model: str,
        auroc: float,
        latency: float = 20.0,
        onnx_path: Path | None = None,
        fresh: bool = False,
    ) -> str:
        """Log (or reuse) a run and write build/eval/<model>/ as the evaluate stage would."""
        onnx_path = onnx_path or self.store.tiny_onnx
        metrics = {
            "image_AUROC": auroc,
            "image_F1Score": 0.5,
            "latency_ms": latency,
            "torch_latency_ms": latency * 2,
            "model_size_mb": onnx_path.stat().st_size / 1e6,
            "onnx_max_abs_diff": 1e-6,
        }
        run_id, model_uri = self.store.log_run(model, metrics, onnx_path, fresh)
        folder = self.eval_dir / model
        (folder / "onnx").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_path, folder / "onnx" / "model.onnx")
        (folder / "metrics.json").write_text(json.dumps(metrics))
        summary = {
            "model": model,
            "run_id": run_id,
            "model_uri": model_uri,
            "metrics": metrics,
            "onnx_path": str(folder / "onnx" / "model.onnx"),
            "image_size": SIZE,
            "input_normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "threshold": 0.5,
            "raw_threshold": 12.5,
            "git_commit": "a" * 40,
            "data_version": "d0d0.dir",
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        return run_id

    def select(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        params = params or self.params()
        return select_mod.run(params, eval_dir=self.eval_dir, out_dir=self.out_dir)

    def promote(self, out: Path | None = None, **kwargs: Any) -> dict[str, Any]:
        return promote(
            self.params(), out=out or self.serving, eval_dir=self.eval_dir, dataset=self.dataset, **kwargs
        )

    def versions(self) -> list[Any]:
        found = self.client.search_model_versions(f"name='{self.model_name}'")
        return sorted(found, key=lambda v: int(v.version))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, serving_model_dir: Path) -> Iterator[Store]:
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-store")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        env.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{root / 'mlflow.db'}")
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            yield Store(root, serving_model_dir / "model.onnx")
        finally:
            # get_client() set MLflow's process-wide URIs; do not leak the temp store to other tests.
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
            mlflow.set_registry_uri(None)  # type: ignore[arg-type]


@pytest.fixture
def ws(store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> Workspace:
    get_client()  # re-pin the URIs in case another module changed them
    return Workspace(store, tmp_path, f"vi-{request.node.name}"[:100])


@pytest.fixture
def ws3(ws: Workspace) -> Workspace:
    """Three evaluated models: patchcore best, padim clearly worse, stfpm best but over max latency."""
    ws.log_eval("padim", 0.90, latency=10)
    ws.log_eval("patchcore", 0.95, latency=80)
    ws.log_eval("stfpm", 0.99, latency=400)
    return ws


def test_select_registers_champion_and_rerun_reuses_version(ws3: Workspace) -> None:
    record = ws3.select()
    summary = json.loads((ws3.eval_dir / "patchcore" / "summary.json").read_text())
    assert record["model"] == "patchcore" and record["version"] == "1"
    assert record["run_id"] == summary["run_id"] and record["model_uri"] == summary["model_uri"]

    alias = ws3.client.get_model_version_by_alias(ws3.model_name, "champion")
    assert str(alias.version) == "1" and alias.run_id == summary["run_id"]
    assert alias.tags["model"] == "patchcore"
    assert alias.tags["selection_metric"] == "image_AUROC"
    assert alias.tags["selection_reason"] == record["reason"]
    assert alias.tags["git_commit"] == "a" * 40 and alias.tags["data_version"] == "d0d0.dir"
    assert alias.tags["previous_champion"] == "none"
    assert "patchcore selected as champion" in alias.description

    selection = json.loads((ws3.out_dir / "selection.json").read_text())
    assert selection["champion"] == "patchcore"
    verdicts = {c["name"]: c for c in selection["candidates"]}
    assert not verdicts["stfpm"]["eligible"] and "latency_ms 400 > max 250" in verdicts["stfpm"]["why"]
    assert '"version"' not in json.dumps(selection)  # registry versions are machine-specific
    champion = json.loads((ws3.out_dir / "champion.json").read_text())
    assert champion["version"] == "1" and champion["name"] == ws3.model_name

    before = (ws3.out_dir / "selection.json").read_bytes()
    again = ws3.select()
    assert again["version"] == "1" and again["reused_existing_version"]
    assert len(ws3.versions()) == 1
    assert (ws3.out_dir / "selection.json").read_bytes() == before


def test_better_model_moves_alias_and_keeps_old_version(ws3: Workspace) -> None:
    ws3.select()
    ws3.log_eval("padim", 0.97, latency=10)  # re-trained padim, new run
    record = ws3.select()
    assert record["model"] == "padim" and record["version"] == "2" and record["previous_version"] == "1"
    versions = ws3.versions()
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert versions[0].tags["model"] == "patchcore"  # old champion survives, untouched
    champ = ws3.client.get_model_version_by_alias(ws3.model_name, "champion")
    assert str(champ.version) == "2" and champ.tags["previous_champion"] == "1"

    # Going back to the earlier best reuses version 1 instead of registering a duplicate.
    ws3.log_eval("padim", 0.80, latency=10)
    record = ws3.select()
    assert record["version"] == "1" and record["reused_existing_version"]
    assert len(ws3.versions()) == 2  # padim@0.80 was never champion: nothing new registered
    assert ws3.client.get_model_version_by_alias(ws3.model_name, "champion").tags["previous_champion"] == "2"


def test_no_eligible_candidate_registers_nothing(ws3: Workspace) -> None:
    params = ws3.params()
    params["selection"]["max_latency_ms"] = 5  # every model is slower than that
    with pytest.raises(NoEligibleCandidateError, match="no eligible candidate"):
        ws3.select(params)
    assert ws3.versions() == []
    assert not (ws3.out_dir / "champion.json").exists()
    # The explanation is left behind for whoever reads the failed stage.
    selection = json.loads((ws3.out_dir / "selection.json").read_text())
    assert selection["champion"] is None and "no eligible candidate" in selection["reason"]
    assert all(not c["eligible"] and "latency_ms" in c["why"] for c in selection["candidates"])


def test_missing_summary_is_a_clear_error(ws: Workspace) -> None:
    ws.log_eval("padim", 0.90, latency=10)
    with pytest.raises(select_mod.RegistryError, match=r"patchcore/summary.json: not found"):
        ws.select()


def test_promote_records_the_champions_input_normalisation(ws3: Workspace) -> None:
    """metadata.json says which mean/std the ONNX graph applies: summary.json's, ImageNet's for a summary
    written before backbone.normalize existed, and a malformed value is one error naming the file."""
    record = ws3.select()
    summary_path = ws3.eval_dir / record["model"] / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["input_normalization"]
    summary_path.write_text(json.dumps(summary))
    meta = ws3.promote()
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406] and meta["normalisation"]["std"][0] == 0.229
    summary["input_normalization"] = {"mean": [0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    summary_path.write_text(json.dumps(summary))
    with pytest.raises(PromoteError, match=r"summary\.json: input_normalization must be"):
        ws3.promote()


def test_promote_writes_valid_serving_model(ws3: Workspace) -> None:
    from core.contract import load_metadata
    from core.scoring import Scorer

    record = ws3.select()
    meta = ws3.promote()
    assert sorted(p.name for p in ws3.serving.iterdir()) == ["metadata.json", "model.onnx"]
    loaded = load_metadata(ws3.serving)
    assert loaded.registry_version == record["version"] == meta["registry_version"]
    assert loaded.run_id == record["run_id"] and loaded.model_name == "patchcore"
    assert loaded.registered_model == ws3.model_name
    assert (loaded.input.name, loaded.input.height, loaded.input.width) == ("input", SIZE, SIZE)
    assert meta["threshold"] == 0.5 and meta["raw_threshold"] == 12.5
    assert meta["metrics"]["image_AUROC"] == 0.95
    # what the champion's graph applies (summary.json), not a constant
    assert meta["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "applied": "inside_model"}
    assert meta["exported_at"].endswith("Z")
    contract_keys = {
        "schema_version", "model_file", "model_sha256", "model_name", "registered_model",
        "registry_version", "run_id", "input", "normalisation", "outputs", "threshold",
        "raw_threshold", "metrics", "git_commit", "data_version", "exported_at",
    }  # fmt: skip
    assert set(meta) == contract_keys

    # Readable by the non-root Lambda user (mkdtemp would have left the folder 0700).
    assert ws3.serving.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in ws3.serving.iterdir())

    image = next((ws3.dataset / "test" / "defect").iterdir())
    result = Scorer.from_dir(ws3.serving).score(image.read_bytes())
    assert 0.0 <= result.score <= 1.0

    # Promoting the same version again is byte-identical (DVC-friendly, no wall-clock timestamp).
    first = {p.name: p.read_bytes() for p in ws3.serving.iterdir()}
    ws3.promote()
    assert {p.name: p.read_bytes() for p in ws3.serving.iterdir()} == first
    assert sorted(p.name for p in ws3.serving.parent.iterdir()) == ["model"]  # no staging leftovers


def test_promote_cli_uses_env_out_dir(ws3: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    ws3.select()
    out = ws3.root / "elsewhere" / "model"
    params_file = ws3.root / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(ws3.params()))
    monkeypatch.setenv(promote_mod.OUT_ENV, str(out))
    argv = ["--params", str(params_file), "--eval-dir", str(ws3.eval_dir), "--dataset", str(ws3.dataset)]
    assert promote_mod.main([*argv, "--champion", str(ws3.out_dir / "champion.json")]) == 0
    assert (out / "metadata.json").is_file() and (out / "model.onnx").is_file()


def test_select_cli(ws3: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    params_file = ws3.root / "params.yaml"
    params_file.write_text(yaml.safe_dump(ws3.params()))
    argv = ["--params", str(params_file), "--eval-dir", str(ws3.eval_dir), "--out-dir", str(ws3.out_dir)]
    assert select_mod.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "patchcore"
    bad = ws3.params()
    bad["selection"]["metric"] = "accuracy"
    params_file.write_text(yaml.safe_dump(bad))
    assert select_mod.main(argv) == 1
    assert "selection.metric: must be one of image_AUROC" in capsys.readouterr().err


def test_promote_refuses_when_alias_missing(ws3: Workspace) -> None:
    with pytest.raises(PromoteError, match="has no alias 'champion'"):
        ws3.promote()
    assert not ws3.serving.exists()
    # Model registered but alias removed (e.g. by hand): still refused.
    ws3.select()
    ws3.client.delete_registered_model_alias(ws3.model_name, "champion")
    with pytest.raises(PromoteError, match="has no alias 'champion'"):
        ws3.promote()
    assert not ws3.serving.exists()


def test_promote_refuses_when_registry_and_eval_disagree(ws3: Workspace) -> None:
    ws3.select()
    ws3.promote()
    before = {p.name: p.read_bytes() for p in ws3.serving.iterdir()}
    # build/eval's export of the champion no longer matches what the registry serves.
    _constant_onnx(ws3.eval_dir / "patchcore" / "onnx" / "model.onnx", score=3.0)
    with pytest.raises(PromoteError, match="differs from"):
        ws3.promote()
    assert {p.name: p.read_bytes() for p in ws3.serving.iterdir()} == before


def test_failure_mid_promote_leaves_previous_serving_model(
    ws3: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws3.select()
    ws3.promote()
    before = {p.name: p.read_bytes() for p in ws3.serving.iterdir()}

    # A new champion, but the process dies after the new files were staged.
    ws3.log_eval("padim", 0.99, latency=10, onnx_path=_constant_onnx(ws3.root / "c.onnx", 0.25))
    assert ws3.select()["model"] == "padim"

    def boom(model_dir: Path) -> None:
        assert (model_dir / "model.onnx").is_file() and (model_dir / "metadata.json").is_file()
        raise RuntimeError("simulated crash after staging")

    with monkeypatch.context() as patch:
        patch.setattr(promote_mod, "validate_model_dir", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            ws3.promote()
    assert {p.name: p.read_bytes() for p in ws3.serving.iterdir()} == before
    assert sorted(p.name for p in ws3.serving.parent.iterdir()) == ["model"]

    # Once the problem is gone, the new champion is promoted.
    meta = ws3.promote()
    assert meta["model_name"] == "padim" and meta["registry_version"] == "2"


def test_promote_refuses_alias_pointing_at_unknown_run(ws3: Workspace) -> None:
    ws3.select()
    ws3.log_eval("patchcore", 0.95, latency=80, fresh=True)  # re-evaluated: new run id, alias not yet moved
    with pytest.raises(PromoteError, match="matches no evaluation summary"):
        ws3.promote()
