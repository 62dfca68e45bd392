"""One scoring core, two adapters: the edge's answer equals the Lambda's for the same image and model."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from PIL import Image

from serving.events import RequestLimits
from serving.service import InferenceService
from serving.storage import ResultStore
from tests.edge.conftest import BUCKET, TABLE, tiny_png
from tests.serving.conftest import elpv_image_bytes, rest_event


def _lambda_answer(service: InferenceService, camera: str, data: bytes, key: str) -> dict:
    """The Lambda handler's answer to the REST v1 event API Gateway sends for the same request."""
    event = rest_event(
        "POST",
        f"/cameras/{camera}/images?mask=base64&regions=true",
        body=data,
        headers={"content-type": "image/png", "idempotency-key": key},
    )
    response = service.handle(event)
    assert response["statusCode"] == 200, response
    return json.loads(response["body"])


def _edge_answer(port: int, camera: str, data: bytes, key: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/cameras/{camera}/images?mask=base64&regions=true",
        data=data,
        headers={"content-type": "image/png", "idempotency-key": key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _images() -> list[bytes]:
    """Small noise, a real ELPV cell (300x300 grey, anomalous and normal), a non-square RGB."""
    import io

    wide = io.BytesIO()
    Image.new("RGB", (90, 40), (200, 30, 30)).save(wide, format="PNG")
    return [tiny_png(1), tiny_png(2, 64), elpv_image_bytes(0), elpv_image_bytes(5), wide.getvalue()]


def test_edge_answer_equals_lambda_answer(cloud, make_config, agent_factory, serving_model_dir: Path) -> None:
    from core.scoring import Scorer

    service = InferenceService(
        Scorer.from_dir(serving_model_dir), ResultStore(TABLE, BUCKET), RequestLimits()
    )
    agent = agent_factory(make_config())
    port = agent.http.port
    verdicts = set()
    for i, data in enumerate(_images()):
        cloud_answer = _lambda_answer(service, "cam-p", data, f"lambda-{i}")
        edge_answer = _edge_answer(port, "cam-p", data, f"edge-{i}")
        assert abs(edge_answer["score"] - cloud_answer["score"]) <= 1e-6
        assert edge_answer["is_anomalous"] == cloud_answer["is_anomalous"]
        assert edge_answer["regions"] == cloud_answer["regions"]
        assert edge_answer["mask"] == cloud_answer["mask"]
        for key in ("confidence", "threshold", "anomalous_area_pct", "model_version", "image_width"):
            assert edge_answer[key] == cloud_answer[key], key
        verdicts.add(edge_answer["is_anomalous"])
    assert verdicts == {True, False}, "the images must cover both verdicts for the comparison to mean much"
