"""A default written in the typed params and a value in the committed params.yaml never disagree.

Why: ``config/params.py`` gives a key a default so an older or smaller params file (a user's, a
test's) still loads; the committed ``params.yaml`` also shows every knob with its value so people
find them. The two are one fact stated for two readers, so this test holds them equal: change one
and it fails until the other follows. Keys without a code default (all of ``deploy``) are written
only in params.yaml.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from config.params import Params, read_yaml
from config.paths import PARAMS_FILE
from experiments.models import MODELS


def _defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """``{dotted key: default}`` of every field with a plain default, nested sections included."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = field.default
        if isinstance(default, BaseModel):
            found.update(_defaults(type(default), f"{key}."))
        elif default is not PydanticUndefined and default is not None:
            found[key] = default
    return found


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return PydanticUndefined
        node = node[part]
    return node


def _cases() -> list[tuple[str, Any]]:
    cases = list(_defaults(Params).items())
    for section in ("data", "backbone", "selection", "registry"):
        annotation = Params.model_fields[section].annotation
        model = next(a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type))
        cases += [(f"{section}.{k}", v) for k, v in _defaults(model).items()]
    for name, row in MODELS.items():
        cases += [(f"models.{name}.{k}", v) for k, v in _defaults(row.settings).items()]
    return cases


@pytest.mark.parametrize(("key", "default"), _cases(), ids=[c[0] for c in _cases()])
def test_code_default_equals_the_committed_value(key: str, default: Any) -> None:
    value = _lookup(read_yaml(PARAMS_FILE), key)
    if value is PydanticUndefined:
        pytest.skip(f"params.yaml leaves {key} to its default")
    if isinstance(default, tuple):
        value = tuple(value)
    assert value == default, f"params.yaml {key} = {value!r}, config/params.py default {default!r}"


def test_the_check_sees_defaults() -> None:
    keys = {key for key, _ in _cases()}
    assert {"data.max_val_good", "train.batch_size", "evaluate.n_heatmaps"} <= keys
