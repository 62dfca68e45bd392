"""dvc.yaml is generated (tools/dvc_yaml.py): the committed file is what the generator writes, and a
model is one row of the model table plus its params.yaml section."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config.paths import REPO_ROOT
from experiments import models
from tools import dvc_yaml


def test_committed_dvc_yaml_is_the_generated_one() -> None:
    committed = (REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8")
    assert committed == dvc_yaml.render(), "dvc.yaml is out of date: run python -m tools.dvc_yaml"
    assert dvc_yaml.main(["--check"]) == 0


def test_a_new_model_is_a_table_row_plus_its_params_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary extra model (a PaDiM under another name) reaches every per-model part of the
    pipeline and validates its params through its row, with no other edit."""
    monkeypatch.setitem(models.MODELS, "padim_wide", models.MODELS["padim"])
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["models"]["padim_wide"] = {"layers": ["blocks.2", "blocks.4", "blocks.6"], "n_features": 200}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    out = tmp_path / "dvc.yaml"

    assert dvc_yaml.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 0
    spec = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert spec["stages"]["train"]["foreach"] == "${models}"  # one train/evaluate stage per model
    select_deps, promote_deps = spec["stages"]["select"]["deps"], spec["stages"]["promote"]["deps"]
    assert {"build/eval/padim_wide/summary.json", "build/eval/padim_wide/metrics.json"} <= set(select_deps)
    assert "build/eval/padim_wide/onnx/model.onnx" in promote_deps
    assert "build/eval/padim_wide/plots/roc.csv" in spec["plots"][0]["roc_all_models"]["y"]
    assert models.model_params("padim_wide", params)["n_features"] == 200
    params["models"]["padim_wide"]["n_features"] = 10_000  # more than the layers' 472 channels
    with pytest.raises(models.ParamsError, match=r"models\.padim_wide\.n_features: 10000 is larger"):
        models.model_params("padim_wide", params)


def test_a_model_missing_from_the_table_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["models"]["fastflow"] = {"layers": ["blocks.2"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    out = tmp_path / "dvc.yaml"
    assert dvc_yaml.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 1
    assert "['fastflow'] not in the model table" in capsys.readouterr().err
    assert not out.exists()


def test_check_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "dvc.yaml"
    stale.write_text("stages: {}\n", encoding="utf-8")
    assert dvc_yaml.main(["--check", "--out", str(stale)]) == 1
    assert stale.read_text(encoding="utf-8") == "stages: {}\n"  # --check writes nothing
