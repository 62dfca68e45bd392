"""Stage configuration for the CDK app: ``params.yaml: deploy`` + ``--context KEY=VALUE`` overrides.

``params.yaml`` is the project's single place for knobs, so the stack reads its defaults and
per-stage values from there (``deploy.defaults`` then ``deploy.stages.<stage>``); a context value
(CDK's ``-c KEY=VALUE``, or ``--context`` on ``python -m infra.app`` / ``release.publish``) wins
over both. Every value is validated here, before any construct exists, so a bad knob is one line
naming the key and the fix instead of a CloudFormation rollback ten minutes later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from config.paths import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"

# Lambda accepts at most 6 MB (6,291,456 bytes) of event JSON for a synchronous invocation. API
# Gateway base64-encodes binary bodies (4/3 growth) and wraps them in headers and request context;
# 64 KiB is a generous allowance for that envelope. The largest decoded image that can reach the
# handler is therefore (6 MiB - 64 KiB) * 3/4; a larger MAX_BODY_BYTES would promise uploads that
# API Gateway answers with its own 413/502 before the handler could.
LAMBDA_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
EVENT_ENVELOPE_BYTES = 64 * 1024
MAX_DELIVERABLE_BODY_BYTES = (LAMBDA_SYNC_PAYLOAD_BYTES - EVENT_ENVELOPE_BYTES) * 3 // 4

# CloudWatch Logs only accepts these retention periods.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192)
STAGE_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ConfigError(ValueError):
    """A deploy knob is missing or invalid; the message names the key and what is allowed."""


@dataclass(frozen=True)
class StageConfig:
    """Everything one stage's stack is built from (see ``params.yaml: deploy`` for meanings)."""

    stage: str
    ecr_repository: str
    image_tag: str | None = None
    image_digest: str | None = None
    architecture: str = "x86_64"
    memory_mb: int = 2048
    timeout_s: int = 25
    reserved_concurrency: int | None = 10
    provisioned_concurrency: int = 0
    max_body_bytes: int = 4_500_000
    # None = derived from reserved_concurrency and request_latency_ms (see stage_throttle).
    throttle_rate: float | None = None
    throttle_burst: int | None = None
    request_latency_ms: float = 600
    throttle_safety_factor: float = 0.8
    log_retention_days: int = 30
    access_log_retention_days: int = 365
    retention_days: int | None = None
    store_original: bool = False
    require_camera_id: bool = True
    results_prefix: str = "results/"
    retain_data: bool = True
    alarm_email: str | None = None
    alarm_5xx_rate: float = 0.05
    alarm_5xx_min_requests: int = 20
    alarm_p95_latency_ms: float = 3000
    alarm_throttles: int = 1
    termination_protection: bool = False
    api_cloudwatch_role: bool = True
    reconcile_grace_hours: float | None = 24
    reconcile_every_hours: int = 24

    @property
    def stack_name(self) -> str:
        """``<repository>-<stage>``: one CloudFormation stack per stage and project."""
        return f"{self.ecr_repository}-{self.stage}"

    @property
    def image_reference(self) -> str:
        """The tag or digest the function runs (a digest pins the exact bytes)."""
        return self.image_digest or self.image_tag or ""

    @property
    def docker_platform(self) -> str:
        """The ``docker build --platform`` matching the function's architecture."""
        return "linux/arm64" if self.architecture == "arm64" else "linux/amd64"

    @property
    def stage_throttle(self) -> tuple[float, int]:
        """``(rate per second, burst)`` for the API stage, so overload is answered 429 by API Gateway.

        Why derived: Lambda answers requests beyond ``reserved_concurrency`` with a throttle, which
        API Gateway turns into a 500 (an error to page on, and retried by clients as a fault). The
        function serves at most ``reserved_concurrency / latency`` requests a second, so the stage
        admits ``safety_factor`` of that (rate) and no more simultaneous requests than there are
        instances (burst); the excess is API Gateway's 429, which callers know to slow down for.
        An explicit ``throttle_rate``/``throttle_burst`` overrides (it may only be lower, see
        :meth:`validate`); without reserved concurrency there is nothing to derive from.
        """
        reserved = self.reserved_concurrency
        if reserved is None:
            return float(self.throttle_rate or 0), int(self.throttle_burst or 0)
        capacity = reserved / (self.request_latency_ms / 1000)
        derived_rate = max(1.0, math.floor(capacity * self.throttle_safety_factor * 10) / 10)
        rate = self.throttle_rate if self.throttle_rate is not None else derived_rate
        burst = self.throttle_burst if self.throttle_burst is not None else reserved
        return float(rate), int(burst)

    def validate(self, *, require_image: bool = True) -> StageConfig:
        """Raise :class:`ConfigError` for the first invalid knob; return ``self`` when all are fine."""
        if not STAGE_RE.match(self.stage):
            raise ConfigError(f"stage {self.stage!r}: use 1-20 lower-case letters, digits or '-'")
        if not re.match(r"^[a-z0-9][a-z0-9._/-]{1,255}$", self.ecr_repository):
            raise ConfigError(f"ecr_repository {self.ecr_repository!r} is not a valid ECR repository name")
        if self.image_tag and self.image_digest:
            raise ConfigError("give image_tag or image_digest, not both")
        if require_image and not (self.image_tag or self.image_digest):
            raise ConfigError(
                "no image: pass --context image_tag=<tag> (the tag `python -m release.publish` pushed) "
                "or --context image_digest=sha256:<hex>"
            )
        if self.image_tag and not TAG_RE.match(self.image_tag):
            raise ConfigError(f"image_tag {self.image_tag!r} is not a valid Docker tag")
        if self.image_digest and not DIGEST_RE.match(self.image_digest):
            raise ConfigError(f"image_digest {self.image_digest!r}: expected sha256:<64 hex digits>")
        if self.architecture not in ("x86_64", "arm64"):
            raise ConfigError(f"architecture {self.architecture!r}: use x86_64 or arm64")
        _in_range("memory_mb", self.memory_mb, 128, 10240)
        _in_range("timeout_s", self.timeout_s, 1, 29)  # API Gateway's integration timeout is 29 s
        if self.reserved_concurrency is not None:
            _in_range("reserved_concurrency", self.reserved_concurrency, 1, 10000)
        _in_range("provisioned_concurrency", self.provisioned_concurrency, 0, 10000)
        if self.reserved_concurrency is not None and self.provisioned_concurrency > self.reserved_concurrency:
            raise ConfigError(
                f"provisioned_concurrency {self.provisioned_concurrency} exceeds reserved_concurrency "
                f"{self.reserved_concurrency}: raise reserved_concurrency or lower provisioned_concurrency"
            )
        _in_range("max_body_bytes", self.max_body_bytes, 1024, MAX_DELIVERABLE_BODY_BYTES)
        _in_range("request_latency_ms", self.request_latency_ms, 1, 29000)
        _in_range("throttle_safety_factor", self.throttle_safety_factor, 0.1, 1)
        if self.throttle_rate is not None:
            _in_range("throttle_rate", self.throttle_rate, 1, 10000)
        if self.throttle_burst is not None:
            _in_range("throttle_burst", self.throttle_burst, 1, 5000)
        self._validate_throttle()
        for key in ("log_retention_days", "access_log_retention_days"):
            if getattr(self, key) not in LOG_RETENTION_DAYS:
                raise ConfigError(f"{key} {getattr(self, key)}: CloudWatch accepts {LOG_RETENTION_DAYS}")
        if self.retention_days is not None:
            _in_range("retention_days", self.retention_days, 1, 36500)
        if not re.match(r"^([A-Za-z0-9._-]+/)+$", self.results_prefix):
            raise ConfigError(
                f"results_prefix {self.results_prefix!r}: use folder names of letters, digits, '.', '_' "
                "or '-', each ending in '/' (e.g. results/)"
            )
        if self.alarm_email is not None and not EMAIL_RE.match(self.alarm_email):
            raise ConfigError(f"alarm_email {self.alarm_email!r} is not an e-mail address")
        _in_range("alarm_5xx_rate", self.alarm_5xx_rate, 0.0001, 1)
        _in_range("alarm_5xx_min_requests", self.alarm_5xx_min_requests, 1, 1_000_000)
        if self.reconcile_grace_hours is not None:
            _in_range("reconcile_grace_hours", self.reconcile_grace_hours, 1, 8760)
        _in_range("reconcile_every_hours", self.reconcile_every_hours, 1, 168)
        _in_range("alarm_p95_latency_ms", self.alarm_p95_latency_ms, 1, 29000)
        _in_range("alarm_throttles", self.alarm_throttles, 1, 1_000_000)
        return self

    def _validate_throttle(self) -> None:
        """An override may throttle harder than derived, never admit more than the function serves."""
        reserved = self.reserved_concurrency
        if reserved is None:
            if self.throttle_rate is None or self.throttle_burst is None:
                raise ConfigError(
                    "reserved_concurrency is null, so the stage throttle cannot be derived: set "
                    "throttle_rate and throttle_burst (requests/s the account's concurrency serves)"
                )
            return
        capacity = reserved / (self.request_latency_ms / 1000)
        if self.throttle_rate is not None and self.throttle_rate > capacity:
            raise ConfigError(
                f"throttle_rate {self.throttle_rate:g} exceeds what reserved_concurrency {reserved} serves "
                f"at request_latency_ms {self.request_latency_ms:g} ({capacity:.1f}/s): the excess would be "
                "Lambda throttles answered 500; lower it or use null (derived)"
            )
        if self.throttle_burst is not None and self.throttle_burst > reserved:
            raise ConfigError(
                f"throttle_burst {self.throttle_burst} exceeds reserved_concurrency {reserved}: the excess "
                "would be Lambda throttles answered 500; lower it or use null (= reserved_concurrency)"
            )


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name} {value!r}: must be a number from {low} to {high}")


_FIELD_TYPES = {f.name: f.type for f in fields(StageConfig)}


def knob_names() -> list[str]:
    """Every key a context or ``params.yaml: deploy`` section may set."""
    return sorted(name for name in _FIELD_TYPES if name != "stage")


def _coerce(name: str, value: Any) -> Any:
    """Context values arrive as strings (``-c memory_mb=4096``); turn them into the field's type."""
    if not isinstance(value, str):
        return value
    kind = str(_FIELD_TYPES[name])
    text = value.strip()
    if "None" in kind and text.lower() in ("", "null", "none"):
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r}: expected {kind.split(' ')[0]}") from exc
    return text


def read_deploy_params(path: Path = PARAMS) -> tuple[dict[str, Any], str]:
    """``(params['deploy'], registry model name)`` from ``params.yaml``."""
    import yaml

    with path.open() as fh:
        params = yaml.safe_load(fh) or {}
    deploy = params.get("deploy")
    if not isinstance(deploy, dict) or not isinstance(deploy.get("stages"), dict):
        raise ConfigError(f"{path} has no deploy.stages section: see README (Deploy to AWS)")
    return deploy, str((params.get("registry") or {}).get("model_name", "visual-inspection"))


def stage_names(path: Path = PARAMS) -> list[str]:
    """The stages ``params.yaml: deploy.stages`` defines."""
    return sorted(read_deploy_params(path)[0]["stages"])


def load_stage(
    stage: str,
    context: dict[str, Any] | None = None,
    *,
    path: Path = PARAMS,
    require_image: bool = True,
) -> StageConfig:
    """Merge defaults, the stage's section and ``context`` into a validated :class:`StageConfig`."""
    deploy, repository = read_deploy_params(path)
    stages = deploy["stages"]
    if stage not in stages:
        raise ConfigError(f"unknown stage {stage!r}: params.yaml deploy.stages has {sorted(stages)}")
    merged: dict[str, Any] = {"ecr_repository": repository}
    for source, values in (
        ("deploy.defaults", deploy.get("defaults")),
        (f"deploy.stages.{stage}", stages[stage]),
    ):
        for key, value in (values or {}).items():
            if key not in _FIELD_TYPES or key == "stage":
                raise ConfigError(f"params.yaml {source}.{key}: unknown knob (known: {sorted(_FIELD_TYPES)})")
            merged[key] = value
    for key, value in (context or {}).items():
        if key not in _FIELD_TYPES or key == "stage":
            raise ConfigError(f"context {key}: unknown knob (known: {sorted(_FIELD_TYPES)})")
        merged[key] = _coerce(key, value)
    return StageConfig(stage=stage, **merged).validate(require_image=require_image)


def parse_context(pairs: list[str]) -> dict[str, str]:
    """``["memory_mb=4096", ...]`` → ``{"memory_mb": "4096"}``; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--context {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def describe(config: StageConfig) -> str:
    """One JSON line with every knob, for logs and dry runs."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)
