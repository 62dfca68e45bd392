"""Config validation (one line naming the key), the CLI, the packaging command, JSON logs, the layer rule."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge.config import ConfigError, load_config, parse_config
from edge.metrics import JsonFormatter

BASE = {"agent_id": "a1", "state_dir": "/tmp/x", "model": {"dir": "/m"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"agent_id": "bad id"}, "agent_id: 'bad id' must be"),
        ({"state_dir": None}, "state_dir: required"),
        ({"model": {}}, "model: set dir"),
        ({"modle": {}}, "modle: unknown key"),
        ({"queue": {"max_depth": 0}}, "queue.max_depth: must be >= 1"),
        ({"queue": {"max_depth": "8"}}, "queue.max_depth: must be an integer"),
        ({"outbox": {"max_bytes": "lots"}}, "outbox.max_bytes: must be a byte count"),
        ({"sources": [{"type": "ftp", "camera_id": "c"}]}, "sources[0].type: must be one of folder, stream"),
        ({"sources": [{"type": "folder", "camera_id": "c"}]}, "sources[0].path: required"),
        (
            {"sources": [{"type": "folder", "camera_id": "c", "path": "/i", "done": "move"}]},
            "sources[0].done_dir: required when done is move",
        ),
        (
            {"sources": [{"type": "stream", "camera_id": "c", "url": "0", "fps": -1}]},
            "sources[0].fps: must be >= 0",
        ),
        ({"cloud": {"table": "t"}}, "cloud.bucket: required"),
        ({"http": {"port": 80, "tls": True}}, "http.tls: unknown key"),
    ],
)
def test_config_errors_are_one_line_naming_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **change})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_sizes_paths_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **BASE,
                "state_dir": "state",
                "outbox": {"max_bytes": "512M"},
                "sources": [{"type": "folder", "camera_id": "c1", "path": "in"}],
            }
        )
    )
    config = load_config(path)
    assert config.outbox.max_bytes == 512 * 1024**2
    assert config.state_dir == tmp_path / "state" and config.sources[0].path == tmp_path / "in"
    assert config.queue.max_depth == 16 and config.cloud is None


def test_cli_check_and_package(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("agent_id: a1\nstate_dir: s\nmodel: {dir: m}\nqueue: {max_depht: 3}\n")
    run = subprocess.run(
        [sys.executable, "-m", "edge", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"vi-edge: {bad}: queue.max_depht: unknown key"

    out = tmp_path / "pkg"
    run = subprocess.run(
        [sys.executable, "-m", "edge", "package", "--out", str(out), "--version", "1.2.3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    unit = (out / "vi-edge.service").read_text()
    assert "ExecStart=/opt/vi-edge/venv/bin/python -m edge run --config /etc/vi-edge/edge.yaml" in unit
    assert "Restart=always" in unit
    recipe = json.loads((out / "com.visualinspection.EdgeAgent-1.2.3.json").read_text())
    assert recipe["ComponentVersion"] == "1.2.3"
    assert (
        "-m edge run --config {configuration:/configPath}"
        in recipe["Manifests"][0]["Lifecycle"]["Run"]["Script"]
    )
    example = load_config_text(out / "edge.yaml.example")
    assert example.sources[0].camera_id == "cam-1"


def load_config_text(path: Path):
    return load_config(path)


def test_json_logs_carry_extra_fields() -> None:
    record = logging.LogRecord("edge.sync", logging.WARNING, __file__, 1, "sync failed", (), None)
    record.failures = 3
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "sync failed" and line["failures"] == 3 and line["level"] == "WARNING"


def test_edge_requirements_pin_what_the_agent_imports() -> None:
    from config.paths import REPO_ROOT

    pins = (REPO_ROOT / "edge" / "requirements.txt").read_text()
    for package in (
        "onnxruntime==",
        "numpy==",
        "pillow==",
        "boto3==",
        "PyYAML==",
        "opencv-python-headless==5.0.0.93",
    ):
        assert package in pins
    assert "opencv-python-headless==5.0.0.93" in (REPO_ROOT / "requirements.txt").read_text()
