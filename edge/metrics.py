"""Counters and gauges in Prometheus text format (``GET /metrics``), plus JSON logs.

Why hand-rolled: the exposition format is a few lines of text, and the agent's install stays small
(no prometheus_client). Names follow Prometheus conventions (``_total`` for counters).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


class Metrics:
    """Thread-safe counters and gauges; gauges may also be read from callbacks at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._callbacks: list[Callable[[], dict[str, float]]] = []

    def inc(self, name: str, amount: float = 1, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            key = (name, _labels(labels))
            self._counters[key] = self._counters.get(key, 0) + amount

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            if name.endswith("_info"):  # one live value per info metric
                self._gauges = {k: v for k, v in self._gauges.items() if k[0] != name}
            self._gauges[(name, _labels(labels))] = value

    def gauge_callback(self, callback: Callable[[], dict[str, float]]) -> None:
        self._callbacks.append(callback)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of a counter over all label sets (``labels`` given: that set only)."""
        with self._lock:
            return sum(
                v
                for (n, lab), v in self._counters.items()
                if n == name and (labels is None or lab == _labels(labels))
            )

    def counters(self) -> dict[str, float]:
        """Counters summed over labels (for /status)."""
        out: dict[str, float] = {}
        with self._lock:
            for (name, _), value in self._counters.items():
                out[name] = out.get(name, 0) + value
        return out

    def render(self) -> str:
        """The Prometheus text exposition format 0.0.4."""
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
        for callback in self._callbacks:
            for name, value in callback().items():
                gauges[(name, ())] = value
        lines: list[str] = []
        for kind, table in (("counter", counters), ("gauge", gauges)):
            for name in sorted({n for n, _ in table}):
                lines.append(f"# TYPE {name} {kind}")
                for (n, labels), value in sorted(table.items()):
                    if n != name:
                        continue
                    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the ``edge`` loggers (journald / Greengrass collect stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("edge")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
