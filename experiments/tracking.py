"""MLflow setup shared by the pipeline stages (and by ``registry/`` via :func:`setup_tracking`).

Why a module: every stage must log to the same store and experiment, never phone home, and not
depend on the working directory (DVC, pytest and people start stages from different places).

* Store: resolved by ``config.tracking_uri.tracking_uri`` (the single writer of that rule, shared with
  ``release.publish``): ``MLFLOW_TRACKING_URI`` if set (relative local paths taken from the repo
  root), else ``sqlite:///<repo>/mlflow.db`` (MLflow 3's model registry needs a database store).
* Artifacts: a local folder ``mlartifacts/`` next to the sqlite database (``<repo>/mlartifacts/`` by
  default), fixed when the experiment is created, so the files live with the database and not
  wherever a stage happened to run; a test's temporary database gets its own temporary folder.
  A tracking server (``http(s)://``, ``databricks`` ...) chooses the artifact location itself
  (``--artifacts-destination``): a local folder of this machine would be wrong for everyone else.
* Grouping: each run is tagged with ``pipeline_id``, a hash of everything that determines a
  pipeline result (params.yaml, the data version, the experiments/ code). The runs written by one
  ``dvc repro`` share it, so ``tags.pipeline_id = '...'`` in the MLflow UI shows that repro side
  by side. A parent run was rejected: DVC skips stages whose inputs did not change, so after a
  partial rerun the skipped models could never be attached to a new parent, while a content hash
  stays meaningful (same id == same inputs) however the stages were scheduled.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from config.paths import REPO_ROOT
from config.tracking_uri import tracking_uri

EXPERIMENT_NAME = "visual-inspection"
# The MLflow 3 UI opens an experiment in its "Model training" view (runs table, metrics, models)
# rather than the GenAI view (traces) when the experiment carries this tag; values from the UI's
# own enum (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT, mapped to MACHINE_LEARNING).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Code whose change changes results; hashed into pipeline_id.
CODE_FILES = (
    "experiments/backbones.py",
    "experiments/models.py",
    "experiments/prepare.py",
    "experiments/train.py",
    "experiments/evaluate.py",
)


def setup_tracking() -> str:
    """Configure MLflow (tracking + registry URI, telemetry off) and return the tracking URI."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def artifact_root(uri: str | None = None) -> Path:
    """``mlartifacts/`` beside a ``sqlite:///`` database; ``<repo>/mlartifacts`` for any other store."""
    uri = uri or tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return Path(uri[len(prefix) :]).resolve().parent / "mlartifacts"
    return REPO_ROOT / "mlartifacts"


def is_tracking_server(uri: str | None = None) -> bool:
    """True when the store is a tracking server (``http(s)://``, ``databricks``), which owns artifacts."""
    scheme = (uri or tracking_uri()).split(":", 1)[0].lower()
    return scheme in ("http", "https", "databricks")


def get_or_create_experiment(name: str = EXPERIMENT_NAME) -> str:
    """Return the id of experiment ``name``, creating it if needed.

    A database store gets the artifact folder of :func:`artifact_root`; a tracking server gets none,
    so the server's own ``--artifacts-destination`` (or default root) applies.

    Safe against a concurrent creator (e.g. two stages or a test starting at once).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    setup_tracking()
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # created before the tag existed
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return experiment.experiment_id
    location = None
    if not is_tracking_server():
        root = artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return mlflow.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(root: Path = REPO_ROOT) -> str:
    """HEAD commit of the repository, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def git_dirty(root: Path = REPO_ROOT, paths: Iterable[str] = CODE_FILES) -> bool:
    """True when the result-relevant code differs from HEAD (the commit tag alone would lie)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(out.stdout.strip())


def data_version(dvc_file: Path = REPO_ROOT / "data.dvc") -> str:
    """The md5 DVC recorded for ``data/`` (e.g. ``d402...c8b4.dir``), or ``"unknown"``."""
    try:
        meta = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
        return str(meta["outs"][0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def data_root(params: Mapping[str, Any]) -> Path:
    """The data folder of ``params`` (``data.root``), absolute; relative roots are taken from the repo."""
    root = Path(str((params.get("data") or {}).get("root", "data")))
    return root if root.is_absolute() else REPO_ROOT / root


def data_digest(params: Mapping[str, Any]) -> str:
    """DVC hash of the data folder: the md5 its ``<root>.dvc`` records, else computed like ``dvc add``.

    The recorded hash is what ``dvc checkout``/``dvc pull`` restores, so it names the data version; a
    folder without a ``.dvc`` file (a benchmark's or a test's data) gets the same hash computed from
    its files, so two runs on equal data still show equal digests.
    """
    root = data_root(params)
    recorded = data_version(root.parent / f"{root.name}.dvc")
    if recorded != "unknown":
        return recorded
    from experiments.data_validation import dvc_dir_md5  # only when nothing is recorded

    return dvc_dir_md5(root) if root.is_dir() else "unknown"


def log_data_input(params: Mapping[str, Any], context: str = "training") -> None:
    """Log the data version as the active run's MLflow dataset input (the UI's Dataset column).

    Digest = the DVC hash (:func:`data_digest`, at most 36 characters as MLflow's store requires);
    name = the data folder's name; source = where it lives (the folder, and the ``.dvc`` file that
    tracks it when there is one).
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    root = data_root(params)
    digest = data_digest(params)
    dataset = MetaDataset(source=LocalArtifactDatasetSource(str(root)), name=root.name, digest=digest[:36])
    dvc_file = root.parent / f"{root.name}.dvc"
    tags = {"dvc_md5": digest, "dvc_file": str(dvc_file) if dvc_file.is_file() else "none"}
    mlflow.log_input(dataset, context=context, tags=tags)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def pipeline_id(params: Mapping[str, Any], data: str, root: Path = REPO_ROOT) -> str:
    """Short content hash of params + data version + code: equal ids mean equal pipeline inputs."""
    digest = hashlib.sha256()
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    digest.update(data.encode())
    for rel in CODE_FILES:
        digest.update(f"{rel}:{_file_digest(root / rel)}".encode())
    return digest.hexdigest()[:16]


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"models": {"padim": {"n_features": 64}}}`` -> ``{"models.padim.n_features": "64"}``."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def run_tags(model: str, params: Mapping[str, Any], stage: str) -> dict[str, str]:
    """Tags that tie a run to its code, data and DVC stage (and ``dvc exp run`` name, if any)."""
    version = data_digest(params)
    tags = {
        "model_name": model,
        "git_commit": git_commit(),
        "git_dirty": str(git_dirty()).lower(),
        "data_version": version,
        "dvc_stage": stage,
        "pipeline_id": pipeline_id(params, version),
    }
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
