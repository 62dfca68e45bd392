"""The one place that decides which MLflow store the project uses (``python -m config.tracking_uri``).

Why here: the training side (``experiments.tracking``, ``registry.mlflow_client``, benchmarks, tests),
the release tool (``release.publish``), the tools and ``make ui`` must resolve the same store.
``config/`` is a ground floor beside ``core/``: stdlib-only, importable by every training-side and
tool package. The Lambda needs no MLflow store, so ``serving/`` does not import it.

Rules:

* ``MLFLOW_TRACKING_URI`` wins when set (a tracking server, a database, ``databricks`` ...).
* A relative local path in it (``sqlite:///mlflow.db``, ``file:mlruns``, ``mlruns``) is taken relative
  to the repository root, never to the working directory: DVC runs stages from the root, pytest and
  people from anywhere, and a store that moves with ``cd`` silently splits the runs and the registry.
* Otherwise ``sqlite:///<repo>/mlflow.db`` (absolute). MLflow 3's model registry needs a database.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.paths import REPO_ROOT

DEFAULT_DB = REPO_ROOT / "mlflow.db"
ENV = "MLFLOW_TRACKING_URI"


def resolve_uri(uri: str, root: Path = REPO_ROOT) -> str:
    """Make a local store URI absolute against ``root``; leave server and absolute URIs unchanged."""
    uri = uri.strip()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return uri if path.startswith("/") or path == ":memory:" else f"sqlite:///{(root / path).resolve()}"
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if path.startswith("//"):
            return uri  # file:///abs or file://host/...
        return uri if path.startswith("/") else (root / path).resolve().as_uri()
    if "://" in uri or uri == "databricks" or uri.startswith("databricks:") or ":" in uri.split("/", 1)[0]:
        return uri  # a server or database URI (http://, postgresql://, databricks://profile ...)
    return str((root / uri).resolve()) if not os.path.isabs(uri) else uri


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (relative local paths made absolute) if set, else ``sqlite:///<repo>/mlflow.db``."""
    value = os.environ.get(ENV, "").strip()
    return resolve_uri(value) if value else f"sqlite:///{DEFAULT_DB}"


if __name__ == "__main__":
    print(tracking_uri())
