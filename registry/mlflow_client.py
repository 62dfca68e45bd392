"""The one place where ``registry/`` decides which MLflow store it talks to.

Why a wrapper: the registry stages must hit exactly the store the evaluation stage logged to
(``MLFLOW_TRACKING_URI``, else the repo's ``sqlite:///mlflow.db``; MLflow 3 refuses a plain
``file:./mlruns`` model registry), must never phone home (telemetry off), and must not depend on the
current working directory, because DVC, pytest and humans start them from different places.
The store is resolved by ``experiments.tracking.setup_tracking`` (→ ``config.tracking_uri``), the same
call the evaluate stage makes, so both sides agree by construction.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from experiments.tracking import setup_tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient


def get_client() -> MlflowClient:
    """Configure MLflow (URI, no telemetry) and return a client bound to that store.

    The registry URI is pinned to the tracking URI so ``models:/`` lookups and
    ``register_model`` use the same database even if ``MLFLOW_REGISTRY_URI`` leaks in from a shell.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # DVC logs are read by humans; a tqdm bar per artifact file is noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    uri = setup_tracking()  # sets both process-wide URIs to the one resolved store
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
