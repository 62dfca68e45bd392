"""Where the checkout is: the one definition of the repository root.

Why one: ``params.yaml``, ``mlflow.db``, ``build/`` and ``serving/model/`` are all found from here,
and DVC, pytest, benchmarks and people start from different working directories. The project is
installed editable (``pip install -e .``), so this file stays inside the checkout.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO_ROOT / "params.yaml"
