"""The agent's one YAML file, read into typed sections; every error is one line naming the key.

Why typed and strict: the agent runs unattended next to a production line. A misspelt key that is
silently ignored (``max_byte: 1G``) would run with a default nobody chose, so unknown keys are
errors too. Sizes accept ``512M`` / ``2G`` suffixes; durations are seconds.

Example (``python -m edge package`` writes one next to the unit files)::

    agent_id: line-3-pc
    state_dir: /var/lib/vi-edge
    model: {dir: /opt/vi-edge/model, follow: "s3://models-bucket/models/champion/", poll_s: 300}
    sources:
      - {type: folder, camera_id: cam-1, path: /srv/inbox/cam-1}
      - {type: stream, camera_id: cam-2, url: "rtsp://10.0.0.12/stream1", fps: 2}
    http: {host: 0.0.0.0, port: 8080}
    queue: {max_depth: 16}
    outbox: {max_bytes: 2G}
    cloud: {table: inspection-results, bucket: inspection-results-bucket, region: eu-west-1}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serving.events import IDENTIFIER_RE

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ConfigError(ValueError):
    """The config file is unreadable or a key is missing, unknown or of the wrong type/range."""


@dataclass(frozen=True)
class ModelConfig:
    """Where the first model comes from and which published champion to follow."""

    dir: Path | None = None  # installed into a slot at first start when no slot holds a model
    follow: str | None = None  # local folder or s3://bucket/prefix/ holding the published champion
    poll_s: float = 300.0
    parity_tolerance: float = 1e-4  # |score - expected| on each reference image
    require_reference: bool = True  # refuse a champion that ships no reference images
    rollback_after_errors: int = 3  # consecutive scoring errors of a new model before rolling back


@dataclass(frozen=True)
class SourceConfig:
    """One input: a hot folder, an OpenCV stream (USB index, RTSP/HTTP URL or video file)."""

    type: str  # "folder" | "stream"
    camera_id: str
    path: Path | None = None  # folder
    done: str = "delete"  # folder: "delete" or "move" processed files
    done_dir: Path | None = None
    rejected_dir: Path | None = None  # folder: undecodable files go here (default <path>/.rejected)
    poll_s: float = 0.2
    url: str | None = None  # stream
    fps: float = 0.0  # stream: frames taken per second at most (0 = every frame)
    buffer: int = 4  # stream: frames held while scoring is behind; the oldest is dropped beyond it
    reconnect_s: float = 1.0


@dataclass(frozen=True)
class HttpConfig:
    """The local API (same routes as the cloud) plus /status, /metrics and /healthz."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    retry_after_s: int = 1


@dataclass(frozen=True)
class QueueConfig:
    """The one bounded queue in front of the scorer, shared by every source."""

    max_depth: int = 16


@dataclass(frozen=True)
class OutboxConfig:
    """Local durable storage of results until they are in the cloud."""

    max_bytes: int = 1024**3
    keep_synced: int = 100_000  # synced verdict rows kept for local GETs (oldest pruned beyond)
    fsync: bool = True


@dataclass(frozen=True)
class CloudConfig:
    """The table and bucket the Lambda writes; absent = results stay local (no sync)."""

    table: str
    bucket: str
    prefix: str = "results/"
    region: str | None = None
    endpoint_url: str | None = None
    batch_size: int = 25
    workers: int = 2  # cameras synced in parallel (one camera's results stay in order)
    interval_s: float = 1.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0


@dataclass(frozen=True)
class EdgeConfig:
    """The whole file."""

    agent_id: str
    state_dir: Path
    model: ModelConfig
    sources: tuple[SourceConfig, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    cloud: CloudConfig | None = None
    log_level: str = "INFO"


class _Section:
    """Typed reads from one mapping; tracks which keys were used to refuse unknown ones."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.used = data, where, set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self._key(key)}: required")
            return default
        return self.data[key]

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self.raw(key, default, required=required)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self._key(key)}: must be a string, got {value!r}")
        return value

    def ident(self, key: str, *, required: bool = True) -> str:
        value = self.str(key, required=required)
        if not IDENTIFIER_RE.match(value or ""):
            raise ConfigError(
                f"{self._key(key)}: {value!r} must be 1-128 of letters, digits, '.', '_', ':', '-'"
            )
        return value

    def path(self, key: str, *, required: bool = False) -> Path | None:
        value = self.str(key, required=required)
        return Path(value).expanduser() if value else None

    def number(self, key: str, default: float, *, minimum: float = 0.0, integer: bool = False) -> Any:
        value = self.raw(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"{self._key(key)}: must be {kind}, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self._key(key)}: must be >= {minimum}, got {value!r}")
        return value

    def size(self, key: str, default: int) -> int:
        value = self.raw(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        found = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
        if not found:
            raise ConfigError(f"{self._key(key)}: must be a byte count such as 500M or 2G, got {value!r}")
        return int(float(found.group(1)) * _UNITS[found.group(2).upper()])

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: must be true or false, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.str(key, default, required=default is None)
        if value not in choices:
            raise ConfigError(f"{self._key(key)}: must be one of {', '.join(choices)}, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used, key=str)
        if unknown:
            raise ConfigError(f"{self._key(str(unknown[0]))}: unknown key")


def _source(data: Any, where: str) -> SourceConfig:
    s = _Section(data, where)
    kind = s.choice("type", ("folder", "stream"))
    camera_id = s.ident("camera_id")
    if kind == "folder":
        path = s.path("path", required=True)
        done = s.choice("done", ("delete", "move"), "delete")
        done_dir = s.path("done_dir")
        if done == "move" and done_dir is None:
            raise ConfigError(f"{where}.done_dir: required when done is move")
        source = SourceConfig(
            type=kind,
            camera_id=camera_id,
            path=path,
            done=done,
            done_dir=done_dir,
            rejected_dir=s.path("rejected_dir"),
            poll_s=s.number("poll_s", 0.2, minimum=0.01),
        )
    else:
        source = SourceConfig(
            type=kind,
            camera_id=camera_id,
            url=str(s.raw("url", required=True)),
            fps=s.number("fps", 0.0),
            buffer=s.number("buffer", 4, minimum=1, integer=True),
            reconnect_s=s.number("reconnect_s", 1.0, minimum=0.01),
        )
    s.done()
    return source


def parse_config(data: Any, *, base: Path | None = None) -> EdgeConfig:
    """Validate a decoded YAML document; relative paths are taken from ``base`` (the file's folder)."""
    top = _Section(data, "")
    agent_id = top.ident("agent_id")
    state_dir = top.path("state_dir", required=True)

    m = _Section(top.raw("model", {}), "model")
    model = ModelConfig(
        dir=m.path("dir"),
        follow=m.str("follow"),
        poll_s=m.number("poll_s", 300.0, minimum=0.05),
        parity_tolerance=m.number("parity_tolerance", 1e-4),
        require_reference=m.flag("require_reference", True),
        rollback_after_errors=m.number("rollback_after_errors", 3, minimum=1, integer=True),
    )
    m.done()
    if model.dir is None and model.follow is None:
        raise ConfigError("model: set dir (a model folder) or follow (a published champion), or both")

    raw_sources = top.raw("sources", [])
    if not isinstance(raw_sources, list):
        raise ConfigError("sources: must be a list")
    sources = tuple(_source(item, f"sources[{i}]") for i, item in enumerate(raw_sources))
    names = [(s.type, s.camera_id, str(s.path or s.url)) for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError("sources: the same source is listed twice")

    h = _Section(top.raw("http", {}), "http")
    http = HttpConfig(
        enabled=h.flag("enabled", True),
        host=h.str("host", "127.0.0.1"),
        port=h.number("port", 8080, integer=True),
        retry_after_s=h.number("retry_after_s", 1, minimum=1, integer=True),
    )
    h.done()
    q = _Section(top.raw("queue", {}), "queue")
    queue = QueueConfig(max_depth=q.number("max_depth", 16, minimum=1, integer=True))
    q.done()
    o = _Section(top.raw("outbox", {}), "outbox")
    outbox = OutboxConfig(
        max_bytes=o.size("max_bytes", 1024**3),
        keep_synced=o.number("keep_synced", 100_000, integer=True),
        fsync=o.flag("fsync", True),
    )
    o.done()

    cloud = None
    if top.raw("cloud") is not None:
        c = _Section(top.raw("cloud"), "cloud")
        cloud = CloudConfig(
            table=c.str("table", required=True),
            bucket=c.str("bucket", required=True),
            prefix=c.str("prefix", "results/"),
            region=c.str("region"),
            endpoint_url=c.str("endpoint_url"),
            batch_size=c.number("batch_size", 25, minimum=1, integer=True),
            workers=c.number("workers", 2, minimum=1, integer=True),
            interval_s=c.number("interval_s", 1.0, minimum=0.01),
            backoff_initial_s=c.number("backoff_initial_s", 1.0, minimum=0.01),
            backoff_max_s=c.number("backoff_max_s", 60.0, minimum=0.01),
            connect_timeout_s=c.number("connect_timeout_s", 2.0, minimum=0.01),
            read_timeout_s=c.number("read_timeout_s", 5.0, minimum=0.01),
        )
        c.done()
    log_level = top.choice("log_level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    top.done()

    def rebase(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() or base is None else base / path

    sources = tuple(
        SourceConfig(
            **{
                **s.__dict__,
                "path": rebase(s.path),
                "done_dir": rebase(s.done_dir),
                "rejected_dir": rebase(s.rejected_dir),
            }
        )
        for s in sources
    )
    follow = model.follow
    if follow and "://" not in follow:
        follow = str(rebase(Path(follow)))
    model = ModelConfig(**{**model.__dict__, "dir": rebase(model.dir), "follow": follow})
    state = rebase(state_dir)
    assert state is not None
    return EdgeConfig(
        agent_id=agent_id,
        state_dir=state,
        model=model,
        sources=sources,
        http=http,
        queue=queue,
        outbox=outbox,
        cloud=cloud,
        log_level=log_level,
    )


def load_config(path: Path | str) -> EdgeConfig:
    """Read and validate ``path``; :class:`ConfigError` messages start with the file name."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} not valid YAML") from exc
    try:
        return parse_config(data, base=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
