"""One tracking-store rule for all callers; the "Model training" view; the data version as dataset input.

All against a real MLflow sqlite store in a temp folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config import tracking_uri as mlflow_uri
from config.paths import REPO_ROOT
from experiments import tracking
from experiments.data_validation import dvc_dir_md5


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite store; MLflow's process-wide URIs are reset afterwards."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield tracking.setup_tracking()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]


def test_uri_is_absolute_and_never_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_uri.tracking_uri() == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/ml.db")
    assert mlflow_uri.tracking_uri() == f"sqlite:///{REPO_ROOT / 'stores' / 'ml.db'}"
    for kept in ("http://127.0.0.1:5000", "sqlite:////srv/m.db", "postgresql://u@h/db", "databricks"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", kept)
        assert mlflow_uri.tracking_uri() == kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:mlruns")
    assert mlflow_uri.tracking_uri() == (REPO_ROOT / "mlruns").as_uri()


def test_every_caller_uses_the_one_resolver(store: str) -> None:
    from registry.mlflow_client import get_client
    from release import publish as release

    assert get_client().tracking_uri == store == tracking.tracking_uri() == mlflow_uri.tracking_uri()
    assert release.resolved_tracking_uri is mlflow_uri.tracking_uri
    readers = []
    for folder in ("experiments", "registry", "serving", "benchmarks"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            # reads only: setting the variable for a child process (benchmarks) is not resolving it
            reads = (
                r"(environ\.get|getenv)\(\s*[\"']MLFLOW_TRACKING_URI"
                r"|environ\[\s*[\"']MLFLOW_TRACKING_URI[\"']\s*\](?!\s*=[^=])"
            )
            if re.search(reads, text):
                readers.append(path.relative_to(REPO_ROOT).as_posix())
    assert readers == [], f"read MLFLOW_TRACKING_URI through config.tracking_uri instead: {readers}"


def test_experiment_opens_in_the_model_training_view(store: str) -> None:
    import mlflow

    experiment_id = tracking.get_or_create_experiment("kind-new")
    tags = mlflow.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND == "custom_model_development"
    old = mlflow.create_experiment("kind-old")  # made before the tag existed
    assert tracking.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old).tags
    assert tracking.get_or_create_experiment("kind-old") == old
    assert mlflow.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_data_version_is_the_runs_dataset_input(store: str, tmp_path: Path) -> None:
    import mlflow

    data = tmp_path / "images"
    (data / "train" / "good").mkdir(parents=True)
    (data / "train" / "good" / "a.png").write_bytes(b"not really a png")
    params = {"data": {"root": str(data)}}
    experiment_id = tracking.get_or_create_experiment("inputs")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_data_input(params)
    (dataset_input,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    expected = dvc_dir_md5(data)
    assert dataset_input.dataset.digest == expected and dataset_input.dataset.name == "images"
    assert str(data) in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # With a .dvc file beside the folder, the digest is what DVC recorded (the tracked version).
    (tmp_path / "images.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: images\n"
    )
    assert tracking.data_digest(params) == "0123456789abcdef0123456789abcdef.dir"
    assert tracking.run_tags("padim", params, "evaluate@padim")["data_version"] == tracking.data_digest(
        params
    )
