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

The optional ``int8`` block (no version bump: a reader that ignores it still serves the fp32 model
correctly) records the quantized champion and the validation figures of its accuracy gate
(``registry/quantize.py``). ``model_file``/``model_sha256`` are present only when the gate passed;
then the file must exist and match its hash like the fp32 model, so a swapped or half-copied
INT8 file is refused at cold start whichever precision is served.
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
class Int8Spec:
    """The ``int8`` block: whether the quantized model passed its gate and, if so, which file it is."""

    passed_gate: bool
    why: str
    model_file: str | None = None
    model_sha256: str | None = None


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
    int8: Int8Spec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        """Absolute path of the ONNX file."""
        return self.model_dir / self.model_file

    @property
    def int8_path(self) -> Path | None:
        """Absolute path of the INT8 ONNX file, or ``None`` when there is none that passed its gate."""
        if self.int8 is None or self.int8.model_file is None:
            return None
        return self.model_dir / self.int8.model_file


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


def _relative_file(value: str, key: str, where: str) -> str:
    if not value or Path(value).is_absolute() or ".." in Path(value).parts:
        raise ModelMetadataError(f"{where}: {key} must be a relative path inside the model dir")
    return value


def _sha256(value: str, key: str, where: str) -> str:
    sha = value.lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelMetadataError(f"{where}: {key} must be 64 hex characters")
    return sha


INT8_FIGURES = (
    "val_image_AUROC_fp32",
    "val_image_AUROC_int8",
    "val_pixel_AUROC_fp32",
    "val_pixel_AUROC_int8",
)


def _parse_int8(block: Any, fp32_file: str, where: str) -> Int8Spec:
    """Validate the optional ``int8`` block (see the module docstring)."""
    iwhere = f"{where}: int8"
    if not isinstance(block, dict):
        raise ModelMetadataError(f"{iwhere} must be a JSON object")
    passed = _require(block, "passed_gate", bool, iwhere)
    why = _require(block, "why", str, iwhere)
    for key in INT8_FIGURES:
        value = block.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise ModelMetadataError(f"{iwhere}.{key} must be a finite number or null, got {value!r}")
    if not passed:
        if block.get("model_file") is not None:
            raise ModelMetadataError(f"{iwhere}: model_file is set but passed_gate is false")
        return Int8Spec(passed_gate=False, why=why)
    model_file = _relative_file(_require(block, "model_file", str, iwhere), "model_file", iwhere)
    if model_file == fp32_file:
        raise ModelMetadataError(f"{iwhere}: model_file must differ from the fp32 model_file {fp32_file!r}")
    sha = _sha256(_require(block, "model_sha256", str, iwhere), "model_sha256", iwhere)
    return Int8Spec(passed_gate=True, why=why, model_file=model_file, model_sha256=sha)


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
    model_file = _relative_file(_require(data, "model_file", str, where), "model_file", where)
    sha = _sha256(_require(data, "model_sha256", str, where), "model_sha256", where)
    int8 = _parse_int8(data["int8"], model_file, where) if data.get("int8") is not None else None

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
        int8=int8,
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
    files = [(meta.model_path, meta.model_sha256, "model_sha256")]
    if meta.int8 is not None and meta.int8.model_file is not None and meta.int8.model_sha256 is not None:
        int8_path = model_dir / meta.int8.model_file
        if not int8_path.is_file():
            raise ModelMetadataError(
                f"{meta_path}: int8.model_file {meta.int8.model_file!r} not found in {model_dir}"
            )
        files.append((int8_path, meta.int8.model_sha256, "int8.model_sha256"))
    if verify_sha256:
        for path, expected, key in files:
            actual = sha256_file(path)
            if actual != expected:
                raise ModelMetadataError(
                    f"{path}: sha256 {actual} does not match {key} {expected} in {meta_path}"
                )
    return meta
