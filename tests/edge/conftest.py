"""Fixtures for the edge agent tests: a published champion, tiny images, configs, the cloud on moto."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from edge.config import EdgeConfig, parse_config

TABLE = "inspection-results"
BUCKET = "inspection-results-bucket"


def tiny_png(index: int, size: int = 24) -> bytes:
    """A distinct small RGB PNG per index (seeded noise over a gradient)."""
    rng = np.random.default_rng(index)
    gradient = np.linspace(0, 200, size, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def drop_file(folder: Path, name: str, data: bytes) -> Path:
    """Put a file into a hot folder the way a camera must: temp name, then atomic rename."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    target = folder / name
    tmp.rename(target)
    return target


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def champion_dir(serving_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a published champion: model + metadata + reference images with scores."""
    from edge.models import write_reference

    out = tmp_path_factory.mktemp("champion") / "champion"
    out.mkdir()
    for name in ("model.onnx", "metadata.json"):
        shutil.copyfile(serving_model_dir / name, out / name)
    refs = tmp_path_factory.mktemp("refs")
    paths = []
    for i in range(3):
        path = refs / f"ref{i}.png"
        path.write_bytes(tiny_png(1000 + i, 48))
        paths.append(path)
    write_reference(out, paths)
    return out


@pytest.fixture
def make_config(tmp_path: Path, champion_dir: Path) -> Callable[..., EdgeConfig]:
    """An EdgeConfig for a test: state under tmp_path, the champion as model.dir, http on a free port."""

    def build(**overrides: Any) -> EdgeConfig:
        data: dict[str, Any] = {
            "agent_id": "test-agent",
            "state_dir": str(tmp_path / "state"),
            "model": {"dir": str(champion_dir)},
            "http": {"host": "127.0.0.1", "port": 0},
            "queue": {"max_depth": 8},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return parse_config(data)

    return build


@pytest.fixture
def cloud(aws_env: str) -> dict[str, str]:
    """The Lambda's table and bucket on moto; returns names + endpoint."""
    from serving.storage import create_resources

    create_resources(TABLE, BUCKET)
    return {"table": TABLE, "bucket": BUCKET, "endpoint_url": aws_env}


@pytest.fixture
def agent_factory() -> Iterator[Callable[[EdgeConfig], Any]]:
    """Start in-process agents; all are stopped at the end of the test."""
    from edge.agent import Agent

    agents: list[Agent] = []

    def start(config: EdgeConfig, **kwargs: Any) -> Agent:
        agent = Agent(config, **kwargs)
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
