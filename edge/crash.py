"""Fault injection for the kill -9 tests: die by SIGKILL at a named point with a given probability.

Why in the product code: "survives kill -9 at any point" is only believable if the points that
matter (files written but no row; row committed but source file not removed; objects in S3 but no
item; item stored but not marked synced) are each hit many times. Random kills from outside hit
them rarely. ``VI_EDGE_CRASH_POINTS="after_files:0.02,after_put:0.05"`` arms them; unset (the
default, and always in production) this is one dict lookup.
"""

from __future__ import annotations

import os
import random
import signal

_ARMED: dict[str, float] | None = None


def _armed() -> dict[str, float]:
    global _ARMED
    if _ARMED is None:
        spec = os.environ.get("VI_EDGE_CRASH_POINTS", "")
        armed = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, probability = part.partition(":")
            armed[name] = float(probability or 1.0)
        _ARMED = armed
    return _ARMED


def crash_point(name: str) -> None:
    """SIGKILL this process here with the armed probability (no cleanup, no flush: a real kill -9)."""
    probability = _armed().get(name)
    if probability and random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
