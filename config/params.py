"""``params.yaml``, the single place for knobs, loaded once into typed, frozen sections.

Why one typed model: every stage, the registry, the CDK app, the release script and the benchmarks
read the same file. When each of them checked the keys it used with its own helpers, the same knob
was validated several ways, with different defaults and different messages. Here every key has one
type, one range and (when it may be left out) one default, and a bad value is one line in one
format, naming the dotted key, what is allowed and what was found::

    params.yaml: data.image_size: must be an integer >= 32 and a multiple of 32 (got 'abc')

Sections the file leaves out are ``None`` on :class:`Params`; :meth:`Params.need` turns a missing
section a stage needs into one line (``params.yaml: missing 'data' section``), so a ``params.yaml``
written for one stage (tests, benchmarks) need not carry every section.

``models.<name>`` sections are typed by the model table (:mod:`experiments.models`), which knows
the models; this module only checks that ``models`` maps names to mappings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from core.preprocess import DEFAULT_RESIZE, RESIZE_POLICIES, ResizePolicy

ORIGIN = "params.yaml"


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or has a bad value (the message names the key)."""


# ----------------------------------------------------------------------------------- error format
def param_error(key: str, allowed: str, got: Any, origin: str = ORIGIN) -> ParamsError:
    """The one error format: ``<origin>: <dotted key>: must be <allowed> (got <value>)``.

    Checks that need more than the key's own value (a layer the backbone lacks, a ceiling another
    knob exceeds) raise through here too, so every params error reads the same way.
    """
    return ParamsError(f"{origin}: {key}: must be {allowed} (got {got!r})")


def invalid(allowed: str) -> PydanticCustomError:
    """The error a value check raises: pydantic collects it, :func:`format_error` prints it."""
    return PydanticCustomError("param", "must be {allowed}", {"allowed": allowed})


def _dotted(prefix: str, loc: Sequence[Any]) -> str:
    return ".".join([p for p in (prefix, *map(str, loc)) if p])


def format_error(exc: ValidationError, prefix: str = "", origin: str = ORIGIN) -> str:
    """The first error of ``exc`` as one line in the format of :func:`param_error`."""
    err = exc.errors(include_url=False)[0]
    key = _dotted(prefix, err["loc"])
    if err["type"] == "param_line":  # already a whole line (a check that formats its own origin)
        return str(err["msg"])
    if err["type"] == "missing":
        return f"{origin}: missing {key}"
    if err["type"] == "param":
        return f"{origin}: {key}: {err['msg']} (got {err['input']!r})"
    if err["type"] == "param_section":  # the message is complete (unknown keys, cross-key checks)
        return f"{origin}: {key}: {err['msg']}" if key else f"{origin}: {err['msg']}"
    return f"{origin}: {key}: {err['msg']} (got {err['input']!r})"


T = TypeVar("T", bound="Section")


def parse(cls: type[T], data: Any, prefix: str = "", origin: str = ORIGIN) -> T:
    """Validate ``data`` as ``cls``; a failure is a one-line :class:`ParamsError` naming ``prefix.key``."""
    try:
        return cls.model_validate({} if data is None else data)
    except ValidationError as exc:
        raise ParamsError(format_error(exc, prefix, origin)) from None


# ----------------------------------------------------------------------- the value checks, once each
def _bounds(ge: float | None, gt: float | None, le: float | None, lt: float | None) -> str:
    if ge is not None and le is not None:
        return f" from {ge:g} to {le:g}"
    if (ge is not None or gt is not None) and (le is not None or lt is not None):
        return f" in {'[' if ge is not None else '('}{ge if ge is not None else gt:g}, " + (
            f"{le if le is not None else lt:g}{']' if le is not None else ')'}"
        )
    parts = [f"{op} {v:g}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None]
    return f" {' and '.join(parts)}" if parts else ""


def integer(
    ge: int | None = None, le: int | None = None, multiple_of: int | None = None, allowed: str = ""
) -> PlainValidator:
    """An int (never a bool or a float) within bounds."""
    text = allowed or (
        "an integer"
        + _bounds(ge, None, le, None)
        + (f" and a multiple of {multiple_of}" if multiple_of else "")
    )

    def check(value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (ge is not None and value < ge)
            or (le is not None and value > le)
            or (multiple_of and value % multiple_of)
        ):
            raise invalid(text)
        return value

    return PlainValidator(check)


def number(
    ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> PlainValidator:
    """A finite int or float within bounds, returned as a float."""
    text = "a number" + _bounds(ge, gt, le, lt)

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise invalid(text)
        v = float(value)
        if (
            (ge is not None and v < ge)
            or (gt is not None and v <= gt)
            or (le is not None and v > le)
            or (lt is not None and v >= lt)
        ):
            raise invalid(text)
        return v

    return PlainValidator(check)


def choice(options: Sequence[str]) -> PlainValidator:
    """One of ``options`` (the allowed values are defined once, where they mean something)."""
    text = f"one of {', '.join(options)}"

    def check(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            raise invalid(text)
        return value

    return PlainValidator(check)


def text(allowed: str = "a non-empty string", pattern: str | None = None) -> PlainValidator:
    """A non-blank string, optionally matching ``pattern``."""

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip() or (pattern and not re.fullmatch(pattern, value)):
            raise invalid(allowed)
        return value

    return PlainValidator(check)


def flag() -> PlainValidator:
    """``true`` or ``false`` (YAML booleans; ``0``/``1`` are numbers, not answers)."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise invalid("true or false")
        return value

    return PlainValidator(check)


def optional(inner: PlainValidator) -> PlainValidator:
    """``null`` or what ``inner`` allows."""
    func: Callable[[Any], Any] = inner.func  # type: ignore[assignment]

    def check(value: Any) -> Any:
        if value is None:
            return None
        try:
            return func(value)
        except PydanticCustomError as exc:
            raise PydanticCustomError("param", "must be null or {allowed}", exc.context) from None

    return PlainValidator(check)


def names(allowed: str = "a non-empty list of layer names") -> PlainValidator:
    """A non-empty list of non-empty strings (a single string counts as a one-item list)."""

    def check(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise invalid(allowed)
        return tuple(value)

    return PlainValidator(check)


# ------------------------------------------------------------------------------------ sections
class Section(BaseModel):
    """A frozen mapping of known keys: an unknown key (a typo) is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _mapping_of_known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise PydanticCustomError(
                "param_section", "must be a mapping (got {got})", {"got": type(data).__name__}
            )
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise PydanticCustomError(
                "param_section",
                "unknown key(s) {unknown}; allowed: {allowed}",
                {"unknown": str(unknown), "allowed": ", ".join(cls.model_fields)},
            )
        return data


class DataSection(Section):
    """``data``: where the images are, their model size, how they are fitted, how many are used."""

    root: Annotated[str, text("a non-empty path")]
    image_size: Annotated[int, integer(ge=32, multiple_of=32)]  # the backbones downsample by 32
    resize: Annotated[ResizePolicy, choice(RESIZE_POLICIES)] = DEFAULT_RESIZE
    max_train: Annotated[int, integer(ge=1)]
    max_test_good: Annotated[int, integer(ge=1)]
    max_test_defect: Annotated[int, integer(ge=1)]
    max_val_good: Annotated[int, integer(ge=1)] = 50
    val_defect_ratio: Annotated[float, number(ge=0, lt=1)] = 0.5


NORMALIZE_CHOICES = ("backbone", "imagenet")  # input statistics: the weights' own (timm), or ImageNet's


class BackboneSection(Section):
    """``backbone``: a timm model and where its weights come from (checked in experiments.backbones)."""

    name: Annotated[str, text("a timm model name")]
    weights: Annotated[str | None, optional(text("'hub' or a weights file path"))] = None
    normalize: Annotated[str, choice(NORMALIZE_CHOICES)] = "backbone"


THRESHOLD_METHODS = ("f1", "normal_quantile")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class ThresholdSection(Section):
    """``train.threshold``: how the image threshold is learned on the validation split."""

    method: Annotated[str, choice(THRESHOLD_METHODS)] = "f1"
    quantile: Annotated[float, number(gt=0, le=1)] = 0.99


class TrainSection(Section):
    """``train``: device, batching and the threshold policy shared by every model."""

    accelerator: Annotated[str, choice(ACCELERATORS)] = "auto"
    batch_size: Annotated[int, integer(ge=1)] = 16
    num_workers: Annotated[int, integer(ge=0)] = 0
    threshold: ThresholdSection = ThresholdSection()


class EvaluateSection(Section):
    """``evaluate``: heat maps kept, latency repeats, and the ONNX-vs-torch tolerance."""

    n_heatmaps: Annotated[int, integer(ge=0)] = 6
    latency_repeats: Annotated[int, integer(ge=1)] = 20
    onnx_tolerance: Annotated[float, number(gt=0)] = 1e-3


#: Metrics the selection rule may rank by; all of them are higher-is-better (docs/contracts.md §3).
SELECTION_METRICS: tuple[str, ...] = ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO")
#: Costs usable as the tie-breaker; lower is better.
TIE_BREAKERS: tuple[str, ...] = ("latency_ms", "model_size_mb", "torch_latency_ms")


class SelectionSection(Section):
    """``selection``: the champion rule's knobs (the rule itself is registry.rule)."""

    metric: Annotated[str, choice(SELECTION_METRICS)]
    tie_tolerance: Annotated[float, number(ge=0)] = 0.005
    tie_breaker: Annotated[str, choice(TIE_BREAKERS)] = "latency_ms"
    max_latency_ms: Annotated[float | None, optional(number(gt=0))] = None
    max_size_mb: Annotated[float | None, optional(number(gt=0))] = None
    # |ONNX - torch| ceiling on pred_score; matches evaluate.onnx_tolerance's default.
    max_onnx_abs_diff: Annotated[float | None, optional(number(ge=0))] = EvaluateSection().onnx_tolerance


_REGISTRY_NAME = text("a non-empty string without quotes", r"[^'\"\\]*\S[^'\"\\]*")


class RegistrySection(Section):
    """``registry``: the MLflow registered model and the alias the champion gets (quotes would
    break MLflow's filter strings)."""

    model_name: Annotated[str, _REGISTRY_NAME]
    alias: Annotated[str, _REGISTRY_NAME] = "champion"


class QuantizeSection(Section):
    """``quantize``: the INT8 copy of the champion and the validation gate it must pass. A file
    without the section gets no INT8 copy (``Params.quantize`` is None); within it, on by default."""

    enabled: Annotated[bool, flag()] = True
    max_image_auroc_drop: Annotated[float, number(ge=0, lt=1)] = 0.005
    max_pixel_auroc_drop: Annotated[float, number(ge=0, lt=1)] = 0.01
    calibration_images: Annotated[int, integer(ge=1)] = 32


class ServingSection(Section):
    """``serving``: where promote writes the model contract folder."""

    model_dir: Annotated[str, text("a non-empty path")]


# Lambda accepts at most 6 MB (6,291,456 bytes) of event JSON for a synchronous invocation. API
# Gateway base64-encodes binary bodies (4/3 growth) and wraps them in headers and request context;
# 64 KiB is a generous allowance for that envelope. The largest decoded image that can reach the
# handler is therefore (6 MiB - 64 KiB) * 3/4; a larger max_body_bytes would promise uploads that
# API Gateway answers with its own 413/502 before the handler could.
LAMBDA_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
EVENT_ENVELOPE_BYTES = 64 * 1024
MAX_DELIVERABLE_BODY_BYTES = (LAMBDA_SYNC_PAYLOAD_BYTES - EVENT_ENVELOPE_BYTES) * 3 // 4
# CloudWatch Logs only accepts these retention periods.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192)
ARCHITECTURES = ("x86_64", "arm64")


def _retention_days(value: Any) -> int:
    if isinstance(value, bool) or value not in LOG_RETENTION_DAYS:
        raise invalid(f"one of CloudWatch's retention periods {LOG_RETENTION_DAYS}")
    return int(value)


class DeployKnobs(Section):
    """Every knob of one deploy stage. No defaults here: ``deploy.defaults`` in params.yaml is where
    they are written (once), and ``deploy.stages.<stage>`` overrides some of them."""

    architecture: Annotated[str, choice(ARCHITECTURES)]
    memory_mb: Annotated[int, integer(ge=128, le=10240)]
    timeout_s: Annotated[int, integer(ge=1, le=29)]  # API Gateway's integration timeout is 29 s
    reserved_concurrency: Annotated[int | None, optional(integer(ge=1, le=10000))]
    provisioned_concurrency: Annotated[int, integer(ge=0, le=10000)]
    max_body_bytes: Annotated[int, integer(ge=1024, le=MAX_DELIVERABLE_BODY_BYTES)]
    # null = derived from reserved_concurrency and request_latency_ms (StageConfig.stage_throttle)
    throttle_rate: Annotated[float | None, optional(number(ge=1, le=10000))]
    throttle_burst: Annotated[int | None, optional(integer(ge=1, le=5000))]
    request_latency_ms: Annotated[float, number(ge=1, le=29000)]
    throttle_safety_factor: Annotated[float, number(ge=0.1, le=1)]
    log_retention_days: Annotated[int, PlainValidator(_retention_days)]
    access_log_retention_days: Annotated[int, PlainValidator(_retention_days)]
    retention_days: Annotated[int | None, optional(integer(ge=1, le=36500))]
    store_original: Annotated[bool, flag()]
    require_camera_id: Annotated[bool, flag()]
    results_prefix: Annotated[
        str,
        text("folder names of letters, digits, '.', '_' or '-', each ending in '/'", r"([A-Za-z0-9._-]+/)+"),
    ]
    retain_data: Annotated[bool, flag()]
    alarm_email: Annotated[str | None, optional(text("an e-mail address", r"[^@\s]+@[^@\s]+\.[^@\s]+"))]
    alarm_5xx_rate: Annotated[float, number(ge=0.0001, le=1)]
    alarm_5xx_min_requests: Annotated[int, integer(ge=1, le=1_000_000)]
    alarm_p95_latency_ms: Annotated[float, number(ge=1, le=29000)]
    alarm_throttles: Annotated[int, integer(ge=1, le=1_000_000)]
    termination_protection: Annotated[bool, flag()]
    api_cloudwatch_role: Annotated[bool, flag()]
    reconcile_grace_hours: Annotated[float | None, optional(number(ge=1, le=8760))]
    reconcile_every_hours: Annotated[int, integer(ge=1, le=168)]

    @model_validator(mode="after")
    def _provisioned_within_reserved(self) -> DeployKnobs:
        if self.reserved_concurrency is not None and self.provisioned_concurrency > self.reserved_concurrency:
            raise PydanticCustomError(
                "param_section",
                "provisioned_concurrency {p} exceeds reserved_concurrency {r}: raise reserved_concurrency "
                "or lower provisioned_concurrency",
                {"p": self.provisioned_concurrency, "r": self.reserved_concurrency},
            )
        self._throttle_within_capacity()
        return self

    def _throttle_within_capacity(self) -> None:
        """An override may throttle harder than derived, never admit more than the function serves."""
        reserved = self.reserved_concurrency
        if reserved is None:
            if self.throttle_rate is None or self.throttle_burst is None:
                raise PydanticCustomError(
                    "param_section",
                    "reserved_concurrency is null, so the stage throttle cannot be derived: set "
                    "throttle_rate and throttle_burst (requests/s the account's concurrency serves)",
                )
            return
        capacity = reserved / (self.request_latency_ms / 1000)
        if self.throttle_rate is not None and self.throttle_rate > capacity:
            raise PydanticCustomError(
                "param_section",
                "throttle_rate {rate} exceeds what reserved_concurrency {r} serves at request_latency_ms "
                "{lat} ({cap}/s): the excess would be Lambda throttles answered 500; lower it or use null "
                "(derived)",
                {
                    "rate": f"{self.throttle_rate:g}",
                    "r": reserved,
                    "lat": f"{self.request_latency_ms:g}",
                    "cap": f"{capacity:.1f}",
                },
            )
        if self.throttle_burst is not None and self.throttle_burst > reserved:
            raise PydanticCustomError(
                "param_section",
                "throttle_burst {b} exceeds reserved_concurrency {r}: the excess would be Lambda throttles "
                "answered 500; lower it or use null (= reserved_concurrency)",
                {"b": self.throttle_burst, "r": reserved},
            )


class DeploySection(Section):
    """``deploy``: the knobs every stage starts from, and each stage's overrides (checked whole:
    :meth:`knobs` validates defaults + overrides together, so a stage is valid as it will run)."""

    defaults: DeployKnobs
    stages: dict[str, dict[str, Any]]

    @model_validator(mode="before")
    @classmethod
    def _stages_are_mappings(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("stages"), Mapping):
            data = dict(data)
            data["stages"] = {k: {} if v is None else v for k, v in data["stages"].items()}
        return data

    @model_validator(mode="after")
    def _every_stage_valid(self) -> DeploySection:
        for stage in self.stages:
            try:
                self.knobs(stage)
            except ParamsError as exc:
                raise PydanticCustomError("param_line", "{line}", {"line": str(exc)}) from None
        return self

    def knobs(
        self, stage: str, overrides: Mapping[str, Any] | None = None, overrides_origin: str = "--context"
    ) -> DeployKnobs:
        """``defaults`` + ``stages[stage]`` (+ ``overrides``, e.g. CDK context), validated as one.

        An error names the place that set the bad value: ``deploy.defaults.<key>``,
        ``deploy.stages.<stage>.<key>`` or ``<overrides_origin> <key>``.
        """
        sources = [
            (f"{ORIGIN}: deploy.defaults.", self.defaults.model_dump()),
            (f"{ORIGIN}: deploy.stages.{stage}.", self.stages[stage]),
            (f"{overrides_origin} ", dict(overrides or {})),
        ]
        merged: dict[str, Any] = {}
        where: dict[str, str] = {}
        for label, values in sources:
            for key, value in values.items():
                merged[key], where[key] = value, label
        try:
            return DeployKnobs.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = str(err["loc"][0]) if err["loc"] else ""
            label = (
                where.get(key, f"{ORIGIN}: deploy.stages.{stage}.")
                if key
                else f"{ORIGIN}: deploy.stages.{stage}"
            )
            line = format_error(exc, origin="").removeprefix(": ")
            raise ParamsError(f"{label}{line}" if key else f"{label}: {line}") from None


ModelSections = dict[str, dict[str, Any]]


class Params(Section):
    """The whole of params.yaml. Absent sections are ``None``; :meth:`need` asks for one."""

    seed: Annotated[int | None, optional(integer(ge=0))] = None
    data: DataSection | None = None
    backbone: BackboneSection | None = None
    train: TrainSection = TrainSection()
    models: ModelSections | None = None
    evaluate: EvaluateSection = EvaluateSection()
    selection: SelectionSection | None = None
    registry: RegistrySection | None = None
    serving: ServingSection | None = None
    quantize: QuantizeSection | None = None
    deploy: DeploySection | None = None

    @model_validator(mode="before")
    @classmethod
    def _models_map_names_to_mappings(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "models" in data:
            models = data["models"]
            if not isinstance(models, Mapping) or not models:
                raise PydanticCustomError(
                    "param_section", "'models' must be a non-empty mapping of model name -> settings", {}
                )
            for name, cfg in models.items():
                if cfg is not None and not isinstance(cfg, Mapping):
                    raise PydanticCustomError(
                        "param_section", "models.{name}: must be a mapping (got {got})",
                        {"name": name, "got": type(cfg).__name__},
                    )  # fmt: skip
            data = {**data, "models": {str(k): dict(v or {}) for k, v in models.items()}}
        return data

    def need(self, section: str) -> Any:
        """The section (or ``seed``), or a one-line error when the file leaves it out."""
        value = getattr(self, section)
        if value is None:
            what = section if section == "seed" else f"'{section}' section"
            raise ParamsError(f"{ORIGIN}: missing {what}")
        return value

    def as_dict(self) -> dict[str, Any]:
        """The params as plain JSON-ready data (sections the file left out omitted), for logging."""
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def model_names(self) -> list[str]:
        """``models`` keys in file order (the order DVC runs them)."""
        return list(self.need("models"))


def as_params(params: Params | Mapping[str, Any]) -> Params:
    """``params`` typed: a :class:`Params` as is, a mapping (params.yaml's dict form) validated."""
    if isinstance(params, Params):
        return params
    return parse(Params, params)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a params file; unreadable or invalid YAML is one line naming the file."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read params file ({exc.strerror or exc})") from exc
    try:
        raw = yaml.safe_load(content)
    except yaml.YAMLError as exc:
        # One line (stage errors are one line): where it broke and what the parser expected.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError(f"{path}: invalid YAML{where}: {' '.join(str(problem).split())}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file: the typed :class:`Params`, or one-line :class:`ParamsError`."""
    return as_params(read_yaml(path))
