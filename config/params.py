"""Read ``params.yaml``, the single place for knobs (see docs/contracts.md).

Kept minimal and stable on purpose: stages call ``load_params()`` and validate the sections they
use themselves (e.g. ``experiments.data_validation.validate_data_params``), so a stage only fails
on the knobs it actually reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or has a bad value (the message names the key)."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Return params.yaml as a dict; raise ParamsError with the file name if it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror or exc})") from exc
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line (stage errors are one line): where it broke and what the parser expected.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError(f"{path}: invalid YAML{where}: {' '.join(str(problem).split())}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(params).__name__}")
    return params
