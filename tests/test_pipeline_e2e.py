"""End-to-end: the real `dvc repro` on a small real subset of the embedded data.

Why a copy of the repo: the test must not touch the developer's build/, mlflow.db or
serving/model, and DVC needs its own git repo to record dvc.lock. The copy gets a small
params set (few images, 64-128 px, one epoch) so the whole pipeline runs in minutes on 2 CPUs,
but every stage is the real one: prepare → train@* → evaluate@* → select → promote.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.paths import REPO_ROOT as REPO

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

SMALL = {
    "data": {
        "image_size": 128,
        "max_train": 48,
        "max_test_good": 16,
        "max_test_defect": 16,
        "max_val_good": 16,
    },
    "train": {"batch_size": 16},
    "evaluate": {"n_heatmaps": 2, "latency_repeats": 5},
}


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git+DVC copy of this repo with small params, after one full `dvc repro`."""
    if not (REPO / "data" / "train" / "good").is_dir():
        pytest.fail("data/ is missing: run `make data` (part of `make test`) first")
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    tracked = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, tracked):
        src = REPO / rel
        if src.is_file():
            dst = work / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copytree(REPO / "data", work / "data", copy_function=os.link)
    params = yaml.safe_load((work / "params.yaml").read_text())
    small = json.loads(json.dumps(SMALL))
    for name, model in params["models"].items():
        if "max_epochs" in model:
            small.setdefault("models", {}).setdefault(name, {})["max_epochs"] = 1
    # at 128 px SuperSimpleNet needs an earlier layer (its feature map must be >= 32x32)
    if "supersimplenet" in params["models"]:
        small.setdefault("models", {}).setdefault("supersimplenet", {})["layers"] = ["blocks.2"]
    (work / "params.yaml").write_text(yaml.safe_dump(_deep_update(params, small), sort_keys=False))
    for stale in ("dvc.lock",):
        (work / stale).unlink(missing_ok=True)
    shutil.rmtree(work / "serving" / "model", ignore_errors=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        # Any attempt to reach the internet fails fast instead of hanging.
        HTTP_PROXY="http://127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="127.0.0.1,localhost",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    _run(["git", "init", "-q", "-b", "main"], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "copy"], work, env)
    _run([str(BIN / "dvc"), "repro"], work, env)
    return work, env


def _metrics(work: Path) -> dict[str, dict]:
    params = yaml.safe_load((work / "params.yaml").read_text())
    return {
        name: json.loads((work / "build" / "eval" / name / "metrics.json").read_text())
        for name in params["models"]
    }


def test_every_model_has_sane_metrics(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, _ = pipeline_repo
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


def test_plots_and_heatmaps_written(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, _ = pipeline_repo
    for name in _metrics(work):
        plots = work / "build" / "eval" / name / "plots"
        assert (plots / "roc.csv").read_text().count("\n") > 2
        assert (plots / "pr.csv").read_text().count("\n") > 2
        assert list((work / "build" / "eval" / name / "heatmaps").glob("*.png"))


def test_champion_registered_and_promoted(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, env = pipeline_repo
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


def test_second_repro_is_a_noop(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, env = pipeline_repo
    lock_before = (work / "dvc.lock").read_text()
    out = _run([str(BIN / "dvc"), "repro"], work, env).stdout
    assert "Running stage" not in out, out
    assert (work / "dvc.lock").read_text() == lock_before


def test_changing_one_model_reruns_only_that_model(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, env = pipeline_repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["models"]["padim"]["n_features"] = int(params["models"]["padim"]["n_features"]) - 8
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([str(BIN / "dvc"), "status", "--json"], work, env).stdout
    changed = set(json.loads(status or "{}"))
    assert "train@padim" in changed
    assert not any(s.startswith(("train@", "evaluate@")) and not s.endswith("@padim") for s in changed), (
        changed
    )
    assert "prepare" not in changed


def test_same_data_and_params_give_same_metrics(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    work, env = pipeline_repo
    name = "patchcore"
    before = json.loads((work / "build" / "eval" / name / "metrics.json").read_text())
    _run(
        [str(BIN / "dvc"), "repro", "--force", "--single-item", f"train@{name}", f"evaluate@{name}"],
        work,
        env,
    )
    after = json.loads((work / "build" / "eval" / name / "metrics.json").read_text())
    for key in ("image_AUROC", "image_F1Score"):
        assert after[key] == before[key], (key, before[key], after[key])


def test_dvc_exp_run_sweeps_one_param(pipeline_repo: tuple[Path, dict[str, str]]) -> None:
    """`dvc exp run -S` (the README's sweep command) runs and records the changed metric."""
    work, env = pipeline_repo
    _run(["git", "checkout", "--", "params.yaml"], work, env)
    _run([str(BIN / "dvc"), "repro"], work, env)  # back to the committed params first
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "baseline", "--allow-empty"], work, env)
    _run(
        [str(BIN / "dvc"), "exp", "run", "-n", "dfm-pca-090", "-S", "models.dfm.pca_level=0.9"],
        work,
        env,
    )
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], work, env).stdout)
    text = json.dumps(shown)
    assert "dfm-pca-090" in text
    assert "0.9" in text and "image_AUROC" in text
