"""The one place where ``registry/`` decides which MLflow store it talks to.

Why a wrapper: the registry stages must hit exactly the store the evaluation stage logged to
(``MLFLOW_TRACKING_URI``, else the repo's ``sqlite:///mlflow.db``; MLflow 3 refuses a plain
``file:./mlruns`` model registry), must never phone home (telemetry off), and must not depend on the
current working directory, because DVC, pytest and humans start them from different places.
If ``experiments.tracking`` provides the same setup, it is used so both sides agree by construction.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DB = REPO_ROOT / "mlflow.db"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute sqlite URI for ``<repo>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def _experiments_setup() -> str | None:
    """Use ``experiments.tracking.setup_tracking()`` when the experiments side provides it."""
    try:
        from experiments import tracking  # type: ignore[attr-defined]
    except ImportError:
        return None
    setup = getattr(tracking, "setup_tracking", None)
    if not callable(setup):
        return None
    uri = setup()
    return uri if isinstance(uri, str) else None


def get_client() -> MlflowClient:
    """Configure MLflow (URI, no telemetry) and return a client bound to that store.

    The registry URI is pinned to the tracking URI so ``models:/`` lookups and
    ``register_model`` use the same database even if ``MLFLOW_REGISTRY_URI`` leaks in from a shell.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # DVC logs are read by humans; a tqdm bar per artifact file is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = _experiments_setup() or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
