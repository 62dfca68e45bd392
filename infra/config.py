"""Stage configuration for the CDK app: ``params.yaml: deploy`` + ``--context KEY=VALUE`` overrides.

``params.yaml`` is the project's single place for knobs, so the stack reads its defaults and
per-stage values from there (``deploy.defaults`` then ``deploy.stages.<stage>``); a context value
(CDK's ``-c KEY=VALUE``, or ``--context`` on ``python -m infra.app`` / ``release.publish``) wins
over both. The knobs, their types and ranges are the typed deploy section
(:class:`config.params.DeployKnobs`); this module adds only what identifies a deployment (stage,
ECR repository, image) and turns context strings into values. Everything is validated before any
construct exists, so a bad knob is one line naming the key and the fix instead of a CloudFormation
rollback ten minutes later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.params import (
    LOG_RETENTION_DAYS,
    MAX_DELIVERABLE_BODY_BYTES,
    DeployKnobs,
    DeploySection,
    ParamsError,
    format_error,
    load_params,
)
from config.paths import PARAMS_FILE, REPO_ROOT

__all__ = [
    "LOG_RETENTION_DAYS",
    "MAX_DELIVERABLE_BODY_BYTES",
    "REPO_ROOT",
    "ConfigError",
    "StageConfig",
    "describe",
    "knob_names",
    "load_stage",
    "parse_context",
    "stage_names",
]

PARAMS = PARAMS_FILE
STAGE_RE = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ECR_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{1,255}$")
KNOBS = tuple(DeployKnobs.model_fields)


class ConfigError(ValueError):
    """A deploy knob is missing or invalid; the message names the key and what is allowed."""


class _StageIdentity:
    """What :class:`StageConfig` adds to the deploy knobs: which stage, repository and image."""

    stage: str
    ecr_repository: str
    image_tag: str | None
    image_digest: str | None

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
        return "linux/arm64" if getattr(self, "architecture", "") == "arm64" else "linux/amd64"

    @property
    def stage_throttle(self) -> tuple[float, int]:
        """``(rate per second, burst)`` for the API stage, so overload is answered 429 by API Gateway.

        Why derived: Lambda answers requests beyond ``reserved_concurrency`` with a throttle, which
        API Gateway turns into a 500 (an error to page on, and retried by clients as a fault). The
        function serves at most ``reserved_concurrency / latency`` requests a second, so the stage
        admits ``safety_factor`` of that (rate) and no more simultaneous requests than there are
        instances (burst); the excess is API Gateway's 429, which callers know to slow down for.
        An explicit ``throttle_rate``/``throttle_burst`` overrides (it may only be lower: checked by
        :class:`config.params.DeployKnobs`); without reserved concurrency there is nothing to derive from.
        """
        knobs: Any = self
        reserved = knobs.reserved_concurrency
        if reserved is None:
            return float(knobs.throttle_rate or 0), int(knobs.throttle_burst or 0)
        capacity = reserved / (knobs.request_latency_ms / 1000)
        derived_rate = max(1.0, math.floor(capacity * knobs.throttle_safety_factor * 10) / 10)
        rate = knobs.throttle_rate if knobs.throttle_rate is not None else derived_rate
        burst = knobs.throttle_burst if knobs.throttle_burst is not None else reserved
        return float(rate), int(burst)

    def validate(self, *, require_image: bool = True) -> StageConfig:
        """Raise :class:`ConfigError` for the first invalid value; return ``self`` when all are fine.

        The knobs are checked by the typed deploy section; here only the identity fields.
        """
        if not STAGE_RE.match(self.stage):
            raise ConfigError(f"stage {self.stage!r}: use 1-20 lower-case letters, digits or '-'")
        if not ECR_RE.match(self.ecr_repository):
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
        try:  # a dataclasses.replace() may have set a bad knob
            DeployKnobs.model_validate({k: getattr(self, k) for k in KNOBS})
        except ValidationError as exc:
            raise ConfigError(format_error(exc, origin=f"stage {self.stage}")) from None
        return self  # type: ignore[return-value]


# A frozen dataclass (``dataclasses.replace``/``asdict`` work on it) whose knob fields are those of
# the typed deploy section: a new knob is one field of DeployKnobs and one line of params.yaml.
StageConfig = dataclasses.make_dataclass(
    "StageConfig",
    [
        ("stage", str),
        ("ecr_repository", str),
        ("image_tag", str | None, dataclasses.field(default=None)),
        ("image_digest", str | None, dataclasses.field(default=None)),
        *[(name, field.annotation) for name, field in DeployKnobs.model_fields.items()],
    ],
    bases=(_StageIdentity,),
    frozen=True,
    kw_only=True,
    namespace={
        "__doc__": "Everything one stage's stack is built from (see params.yaml: deploy).",
        "__module__": __name__,
    },
)


def knob_names() -> list[str]:
    """Every key a context may set: the typed deploy knobs and the deployment's identity."""
    return sorted((*KNOBS, "ecr_repository", "image_tag", "image_digest"))


def _deploy(path: Path) -> tuple[DeploySection, str]:
    """``(deploy section, registry model name)`` of a params file."""
    try:
        params = load_params(path)
    except ParamsError as exc:
        raise ConfigError(str(exc)) from None
    if params.deploy is None:
        raise ConfigError(f"{path} has no deploy section: see docs/deploy.md")
    return params.deploy, params.need("registry").model_name


def stage_names(path: Path = PARAMS) -> list[str]:
    """The stages ``params.yaml: deploy.stages`` defines."""
    return sorted(_deploy(path)[0].stages)


def _context_value(key: str, value: Any) -> Any:
    """Context values arrive as strings (``-c memory_mb=4096``): read knob values as YAML scalars
    (``4096``, ``true``, ``null``); identity fields (image tags) stay strings."""
    if key not in KNOBS or not isinstance(value, str):
        return value
    text = value.strip()
    if text == "":
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return value
    return parsed if isinstance(parsed, str | int | float | bool) or parsed is None else value


def load_stage(
    stage: str,
    context: dict[str, Any] | None = None,
    *,
    path: Path = PARAMS,
    require_image: bool = True,
) -> StageConfig:
    """Merge defaults, the stage's section and ``context`` into a validated :class:`StageConfig`."""
    deploy, repository = _deploy(path)
    if stage not in deploy.stages:
        raise ConfigError(f"unknown stage {stage!r}: params.yaml deploy.stages has {sorted(deploy.stages)}")
    context = dict(context or {})
    identity = {k: context.pop(k) for k in ("ecr_repository", "image_tag", "image_digest") if k in context}
    unknown = sorted(set(context) - set(KNOBS))
    if unknown:
        raise ConfigError(f"--context {unknown[0]}: unknown knob (known: {knob_names()})")
    try:
        knobs = deploy.knobs(stage, {k: _context_value(k, v) for k, v in context.items()})
    except ParamsError as exc:
        raise ConfigError(str(exc)) from None
    identity.setdefault("ecr_repository", repository)
    config = StageConfig(stage=stage, **identity, **knobs.model_dump())
    return config.validate(require_image=require_image)


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
