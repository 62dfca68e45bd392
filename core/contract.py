"""Load and validate ``metadata.json`` (schema_version 2, ``docs/contracts.md`` section 5).

The Lambda must refuse to start with a model it cannot interpret correctly: a wrong
input size, a missing output name or a swapped ``model.onnx`` would silently produce
wrong scores. Validation therefore happens once, at cold start, with errors that name
the file and the field at fault.

Version 2 adds ``input.geometry`` (the resize policy: letterbox, stretch or center_crop) and
``input.bit_depth`` (how integer pixels become [0, 1]; see :mod:`core.preprocess`). The bump
is what makes an *older* serving build refuse a model whose pixels it would prepare wrongly.
Version 1 files are still read: they were written when serving always stretched and knew no
other rule, so they mean ``geometry: stretch``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import sha256_file
from core.preprocess import BIT_DEPTH_RULE, DEFAULT_RESIZE, PreprocessError, check_resize

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
METADATA_FILE = "metadata.json"
# The fixed part of ``input`` (everything but name and size): what scoring.py feeds the graph.
FIXED_INPUT: dict[str, Any] = {
    "channels": 3,
    "color": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
    "range": [0.0, 1.0],
    "resize": "bilinear",
}


class ModelMetadataError(ValueError):
    """``metadata.json`` or the model file it describes is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class InputSpec:
    """What the ONNX graph expects: ``float32[1, channels, height, width]`` RGB in [0, 1]."""

    name: str
    height: int
    width: int
    channels: int = 3
    resize: str = DEFAULT_RESIZE  # metadata.json: input.geometry


@dataclass(frozen=True)
class ModelMetadata:
    """The validated subset of ``metadata.json`` that serving relies on (plus the raw dict)."""

    model_dir: Path
    model_file: str
    model_sha256: str
    model_name: str
    registered_model: str
    registry_version: str
    input: InputSpec
    score_output: str
    anomaly_map_output: str
    threshold: float
    run_id: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        """Absolute path of the ONNX file."""
        return self.model_dir / self.model_file


def input_block(name: str, height: int, width: int, resize: str = DEFAULT_RESIZE) -> dict[str, Any]:
    """The ``input`` section of metadata.json, for whoever writes it (promote, test fixtures)."""
    return {
        "name": name,
        "height": height,
        "width": width,
        **copy.deepcopy(FIXED_INPUT),
        "geometry": check_resize(resize, "input.geometry"),
        "bit_depth": BIT_DEPTH_RULE,
    }


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Fetch ``data[key]`` and check its type, or raise naming the field."""
    if key not in data:
        raise ModelMetadataError(f"{where}: missing field {key!r}")
    value = data[key]
    # bool is an int subclass; never accept it where a number is expected.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ModelMetadataError(f"{where}: field {key!r} must be {kind}, got bool")
    if not isinstance(value, kind):
        raise ModelMetadataError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")
    return value


def _positive_int(data: dict[str, Any], key: str, where: str) -> int:
    value = _require(data, key, int, where)
    if value <= 0:
        raise ModelMetadataError(f"{where}: field {key!r} must be > 0, got {value}")
    return value


def parse_metadata(data: Any, model_dir: Path, *, where: str = METADATA_FILE) -> ModelMetadata:
    """Validate a decoded metadata document (no file-system checks) and return it typed."""
    if not isinstance(data, dict):
        raise ModelMetadataError(f"{where}: top level must be a JSON object")
    version = _require(data, "schema_version", int, where)
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ModelMetadataError(
            f"{where}: unsupported schema_version {version} (this serving code reads "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); deploy a serving build that matches the model"
        )
    model_file = _require(data, "model_file", str, where)
    if not model_file or Path(model_file).is_absolute() or ".." in Path(model_file).parts:
        raise ModelMetadataError(f"{where}: model_file must be a relative path inside the model dir")
    sha = _require(data, "model_sha256", str, where).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelMetadataError(f"{where}: model_sha256 must be 64 hex characters")

    inp = _require(data, "input", dict, where)
    iwhere = f"{where}: input"
    for key in ("color", "layout", "dtype"):
        expected = FIXED_INPUT[key]
        if key in inp and inp[key] != expected:
            raise ModelMetadataError(f"{iwhere}.{key} is {inp[key]!r}; serving only supports {expected!r}")
    channels = _positive_int(inp, "channels", iwhere) if "channels" in inp else 3
    if channels != 3:
        raise ModelMetadataError(f"{iwhere}.channels is {channels}; serving only supports 3 (RGB)")
    name = _require(inp, "name", str, iwhere)
    height, width = _positive_int(inp, "height", iwhere), _positive_int(inp, "width", iwhere)
    if version == 1:  # before geometry was recorded, serving always stretched
        resize = "stretch"
    else:
        try:
            resize = check_resize(_require(inp, "geometry", str, iwhere), f"{iwhere}.geometry")
        except PreprocessError as exc:
            raise ModelMetadataError(
                f"{exc}; this serving code cannot prepare images for this model"
            ) from exc
        bit_depth = _require(inp, "bit_depth", str, iwhere)
        if bit_depth != BIT_DEPTH_RULE:
            raise ModelMetadataError(
                f"{iwhere}.bit_depth is {bit_depth!r}; this serving code only applies {BIT_DEPTH_RULE!r}"
            )
    input_spec = InputSpec(name=name, height=height, width=width, channels=channels, resize=resize)

    outputs = _require(data, "outputs", dict, where)
    threshold = float(_require(data, "threshold", (int, float), where))
    if not math.isfinite(threshold):
        raise ModelMetadataError(f"{where}: threshold must be finite, got {threshold}")

    return ModelMetadata(
        model_dir=model_dir,
        model_file=model_file,
        model_sha256=sha,
        model_name=_require(data, "model_name", str, where),
        registered_model=str(data.get("registered_model", "")),
        registry_version=str(_require(data, "registry_version", (str, int), where)),
        input=input_spec,
        score_output=_require(outputs, "score", str, f"{where}: outputs"),
        anomaly_map_output=_require(outputs, "anomaly_map", str, f"{where}: outputs"),
        threshold=threshold,
        run_id=str(data.get("run_id", "")),
        raw=data,
    )


def load_metadata(model_dir: Path | str, *, verify_sha256: bool = True) -> ModelMetadata:
    """Read ``<model_dir>/metadata.json``, validate it, and check the model file it names.

    ``verify_sha256`` hashes the model (tens of ms for a few MB) so a half-copied or swapped
    model is caught at cold start rather than producing plausible-looking wrong scores.
    """
    model_dir = Path(model_dir).resolve()
    meta_path = model_dir / METADATA_FILE
    if not meta_path.is_file():
        raise ModelMetadataError(f"{meta_path}: not found (is MODEL_DIR right?)")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelMetadataError(f"{meta_path}: not valid JSON ({exc})") from exc
    meta = parse_metadata(data, model_dir, where=str(meta_path))
    if not meta.model_path.is_file():
        raise ModelMetadataError(f"{meta_path}: model_file {meta.model_file!r} not found in {model_dir}")
    if verify_sha256:
        actual = sha256_file(meta.model_path)
        if actual != meta.model_sha256:
            raise ModelMetadataError(
                f"{meta.model_path}: sha256 {actual} does not match model_sha256 {meta.model_sha256} "
                f"in {meta_path}"
            )
    return meta
