"""``python -m edge package --out DIR``: a systemd unit, a Greengrass v2 recipe and an example config.

Why generated: the unit and the recipe must start the same command with the same config path and
state folder as the docs say; writing them from one function keeps the three in step.
"""

from __future__ import annotations

import json
from pathlib import Path

COMPONENT = "com.visualinspection.EdgeAgent"
CONFIG_PATH = "/etc/vi-edge/edge.yaml"
STATE_DIR = "/var/lib/vi-edge"

EXAMPLE_CONFIG = f"""\
# vi-edge configuration: see edge/README.md. Unknown keys are errors.
agent_id: line-1-pc
state_dir: {STATE_DIR}
model:
  dir: /opt/vi-edge/model            # first model (model.onnx + metadata.json)
  # follow: s3://models-bucket/models/champion/   # published champion to follow
  poll_s: 300
sources:
  - {{type: folder, camera_id: cam-1, path: /srv/vi-edge/inbox/cam-1}}
  # - {{type: stream, camera_id: cam-2, url: "rtsp://10.0.0.12/stream1", fps: 2}}
http: {{host: 0.0.0.0, port: 8080}}
queue: {{max_depth: 16}}
outbox: {{max_bytes: 2G}}
# cloud: {{table: inspection-results, bucket: inspection-results-bucket, region: eu-west-1}}
"""


def systemd_unit(python: str = "/opt/vi-edge/venv/bin/python") -> str:
    """Restart always (a kill -9 or crash loses nothing: the outbox is durable); memory capped."""
    return f"""\
[Unit]
Description=Visual inspection edge agent (scores next to the camera, syncs to the cloud)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={python} -m edge run --config {CONFIG_PATH}
Restart=always
RestartSec=2
StateDirectory=vi-edge
WorkingDirectory={STATE_DIR}
Environment=OMP_WAIT_POLICY=PASSIVE
MemoryMax=600M
NoNewPrivileges=true
ProtectSystem=strict
ReadWritePaths={STATE_DIR} /srv/vi-edge
KillSignal=SIGTERM
TimeoutStopSec=40

[Install]
WantedBy=multi-user.target
"""


def greengrass_recipe(version: str = "1.0.0") -> dict:
    """A Greengrass v2 component recipe (JSON form) running the same command."""
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": COMPONENT,
        "ComponentVersion": version,
        "ComponentDescription": "Scores images next to the camera with the champion model and syncs results.",
        "ComponentPublisher": "visual-inspection",
        "ComponentConfiguration": {"DefaultConfiguration": {"configPath": CONFIG_PATH}},
        "Manifests": [
            {
                "Platform": {"os": "linux"},
                "Lifecycle": {
                    "Install": {
                        "Script": "python3 -m venv {artifacts:decompressedPath}/venv && "
                        "{artifacts:decompressedPath}/venv/bin/pip install --only-binary=:all: "
                        "-r {artifacts:decompressedPath}/vi-edge/edge/requirements.txt",
                        "Timeout": 900,
                    },
                    "Run": {
                        "Script": "cd {artifacts:decompressedPath}/vi-edge && OMP_WAIT_POLICY=PASSIVE "
                        "{artifacts:decompressedPath}/venv/bin/python -m edge run "
                        "--config {configuration:/configPath}",
                        "RequiresPrivilege": False,
                    },
                },
                "Artifacts": [
                    {"URI": f"s3://REPLACE-ME/{COMPONENT}/{version}/vi-edge.zip", "Unarchive": "ZIP"}
                ],
            }
        ],
    }


def component_version(registry_version: str) -> str:
    """Greengrass wants semantic versions: registry version N of the champion is ``N.0.0``."""
    return f"{int(registry_version)}.0.0" if str(registry_version).isdigit() else "1.0.0"


def write_package(out: Path, version: str = "1.0.0") -> list[Path]:
    """Write the three files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vi-edge.service": systemd_unit(),
        f"{COMPONENT}-{version}.json": json.dumps(greengrass_recipe(version), indent=2) + "\n",
        "edge.yaml.example": EXAMPLE_CONFIG,
    }
    paths = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths
