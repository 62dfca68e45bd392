"""The answer (confidence, mask, area, regions, overrides), the GET result routes and EMF metrics."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from core.answer import analyse, confidence, label_regions
from core.scoring import Scorer
from serving.events import RequestLimits
from serving.service import InferenceService
from serving.storage import ResultStore
from tests.serving.conftest import BUCKET, TABLE, elpv_image_bytes, json_body, rest_event


def test_confidence_is_distance_from_threshold_relative_to_its_side() -> None:
    assert confidence(0.5, 0.5) == 0.0
    assert confidence(1.0, 0.5) == confidence(0.0, 0.5) == 1.0
    assert confidence(0.75, 0.5) == 0.5
    assert confidence(0.3, 0.2) == pytest.approx(0.125)
    assert confidence(0.1, 0.2) == pytest.approx(0.5)
    assert confidence(7.0, 0.5) == 1.0 and confidence(-3.0, 0.5) == 1.0  # clipped


def test_regions_boxes_in_original_pixels_sorted_by_peak() -> None:
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[1:3, 1:4] = 0.9  # 6 px
    heat[8, 1] = 0.6  # 1 px
    heat[5, 5] = heat[6, 6] = 0.7  # diagonal neighbours: one region
    result = analyse(heat, 0.5, (10, 10), (100, 50))
    assert result.anomalous_area_pct == pytest.approx(9.0)
    assert [r["peak_score"] for r in result.regions] == pytest.approx([0.9, 0.7, 0.6])
    first, diagonal, single = result.regions
    assert (first["x"], first["y"], first["width"], first["height"]) == (10, 5, 30, 10)
    assert (diagonal["x"], diagonal["y"], diagonal["width"], diagonal["height"]) == (50, 25, 20, 10)
    assert (single["x"], single["y"], single["width"], single["height"]) == (10, 40, 10, 5)
    assert first["area_pct"] == pytest.approx(6.0)
    # A higher threshold drops the weaker regions.
    assert [r["peak_score"] for r in analyse(heat, 0.8, (10, 10), (100, 50)).regions] == pytest.approx([0.9])


def test_label_regions_u_shape_is_one_component() -> None:
    mask = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    (region,) = label_regions(mask, mask.astype(np.float32))
    assert (region["x0"], region["y0"], region["x1"], region["y1"], region["pixels"]) == (0, 0, 3, 3, 7)


def _service(scorer: Scorer) -> InferenceService:
    return InferenceService(scorer, ResultStore(TABLE, BUCKET, "results/"), RequestLimits())


def _post(service: InferenceService, image: bytes, key: str, **fields: Any) -> dict[str, Any]:
    query = fields.pop("query", None)
    target = "/cameras/cam-r/images" + ("?" + urlencode(query) if query else "")
    event = rest_event(
        "POST",
        target,
        body=json_body(image, **fields),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    return service.handle(event, None)


def _get(service: InferenceService, target: str) -> dict[str, Any]:
    return service.handle(rest_event("GET", target), None)


def test_answer_with_mask_regions_and_threshold_override(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    data = elpv_image_bytes(5)
    response = _post(service, data, "a-1", threshold=0.3, query={"mask": "base64", "regions": "true"})
    assert response["statusCode"] == 200, response
    body = json.loads(response["body"])
    assert body["threshold"] == 0.3 and body["threshold_source"] == "request"
    assert body["is_anomalous"] == (body["score"] >= 0.3)
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["confidence"] == confidence(body["score"], 0.3)
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"]["base64"])))
    assert mask.size == (300, 300) == (body["image_width"], body["image_height"])
    pixels = np.asarray(mask.convert("L")) > 0
    assert body["anomalous_area_pct"] == pytest.approx(100.0 * pixels.mean(), abs=1e-3)
    for region in body["regions"]:
        assert 0 <= region["x"] < region["x"] + region["width"] <= 300
        assert 0 <= region["y"] < region["y"] + region["height"] <= 300
        assert 0.3 <= region["peak_score"] <= 1.0
        window = pixels[
            region["y"] : region["y"] + region["height"], region["x"] : region["x"] + region["width"]
        ]
        assert window.any()
    # Recorded with the result: the GET answer is the POST answer.
    got = _get(service, "/cameras/cam-r/results/a-1?regions=true&mask=base64")
    assert got["statusCode"] == 200
    assert json.loads(got["body"]) == body
    # Same image, same key, default threshold: a different request → 409, not the 0.3 verdict.
    assert _post(service, data, "a-1")["statusCode"] == 409


def test_mask_url_is_a_working_presigned_link(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    response = _post(service, elpv_image_bytes(6), "u-1", mask="url")
    body = json.loads(response["body"])
    url = body["mask"]["url"]
    assert (url.startswith(aws_resources) and "Signature" in url) or "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=10) as resp:  # loopback (moto)
        png = resp.read()
    assert Image.open(io.BytesIO(png)).size == (300, 300)
    assert "regions" not in body  # only on request


def test_results_by_time_with_pagination(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    times = ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]
    for i, when in enumerate(times):
        assert _post(service, elpv_image_bytes(i), f"t-{i}", captured_at=when)["statusCode"] == 200
    listing = json.loads(_get(service, "/cameras/cam-r/results?since=2026-01-02T00:00:00Z")["body"])
    assert [r["request_id"] for r in listing["results"]] == ["t-1", "t-2"]
    assert listing["next_token"] is None
    page = json.loads(_get(service, "/cameras/cam-r/results?limit=2")["body"])
    assert [r["request_id"] for r in page["results"]] == ["t-0", "t-1"] and page["next_token"]
    rest = json.loads(
        _get(service, f"/cameras/cam-r/results?limit=2&next_token={page['next_token']}")["body"]
    )
    assert [r["request_id"] for r in rest["results"]] == ["t-2"]
    until = json.loads(_get(service, "/cameras/cam-r/results?until=2026-01-01T12:00:00Z")["body"])
    assert [r["request_id"] for r in until["results"]] == ["t-0"]
    assert json.loads(_get(service, "/cameras/other/results")["body"])["results"] == []


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        ("/cameras/cam-r/results/nope", 404, "result_not_found"),
        ("/cameras/cam-r/results?limit=0", 400, "invalid_limit"),
        ("/cameras/cam-r/results?limit=abc", 400, "invalid_limit"),
        ("/cameras/cam-r/results?since=yesterday", 400, "invalid_since"),
        ("/cameras/cam-r/results?next_token=garbage", 400, "invalid_next_token"),
        ("/cameras/cam-r/results?mask=base64", 400, "invalid_mask"),
        ("/cameras/bad%20cam/results", 400, "invalid_camera_id"),
    ],
)
def test_results_bad_requests(
    aws_resources: str, scorer: Scorer, target: str, status: int, code: str
) -> None:
    response = _get(_service(scorer), target)
    assert response["statusCode"] == status, response
    assert json.loads(response["body"])["error"]["code"] == code


def test_next_token_of_another_camera_is_refused(aws_resources: str, scorer: Scorer) -> None:
    service = _service(scorer)
    for i in range(2):
        _post(service, elpv_image_bytes(i), f"n-{i}")
    token = json.loads(_get(service, "/cameras/cam-r/results?limit=1")["body"])["next_token"]
    response = _get(service, f"/cameras/cam-x/results?next_token={token}")
    assert response["statusCode"] == 400


def test_emf_metrics_per_phase_camera_and_error(
    aws_resources: str, scorer: Scorer, capsys: pytest.CaptureFixture[str]
) -> None:
    service = _service(scorer)
    capsys.readouterr()
    assert _post(service, elpv_image_bytes(7), "m-1")["statusCode"] == 200
    bad = rest_event("POST", "/cameras/cam-r/images", body=b"junk", headers={"Content-Type": "image/png"})
    assert service.handle(bad, None)["statusCode"] == 422
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        for directive in line["_aws"]["CloudWatchMetrics"]:
            for metric in directive["Metrics"]:
                by_metric.setdefault(metric["Name"], []).append(line | {"dims": directive["Dimensions"][0]})
    phases = {
        "parse",
        "decode",
        "lookup",
        "score",
        "preprocess",
        "inference",
        "postprocess",
        "analyse",
        "overlay",
        "s3_put_overlay",
        "s3_put_mask",
        "dynamodb_put",
        "persist",
        "total",
    }
    assert {f"latency_{phase}" for phase in phases} <= set(by_metric), sorted(by_metric)
    scored = [line for line in lines if "latency_s3_put_overlay" in line]
    assert len(scored) == 1 and scored[0]["latency_dynamodb_put"][0] > 0
    (anomalies,) = by_metric["anomalies"]
    assert anomalies["camera_id"] == "cam-r" and "camera_id" in anomalies["dims"]
    (errors,) = by_metric["errors"]
    assert errors["error_code"] == "invalid_image" and errors["errors"] == [1.0]


def test_label_regions_matches_a_flood_fill_on_random_masks() -> None:
    """Run-based labelling = pixel flood fill (8-connectivity), incl. runs touching the last pixel."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        values = rng.random((23, 31)).astype(np.float32)
        mask = values > 0.55
        mask[-1, -1] = True
        got = sorted(
            (r["x0"], r["y0"], r["x1"], r["y1"], r["pixels"], r["peak"]) for r in label_regions(mask, values)
        )
        seen = np.zeros_like(mask)
        expected = []
        for y0, x0 in zip(*np.nonzero(mask), strict=True):
            if seen[y0, x0]:
                continue
            stack, pixels = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                pixels.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if (
                            0 <= ny < mask.shape[0]
                            and 0 <= nx < mask.shape[1]
                            and mask[ny, nx]
                            and not seen[ny, nx]
                        ):
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            ys, xs = zip(*pixels, strict=True)
            peak = float(max(values[p] for p in pixels))
            expected.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1, len(pixels), peak))
        assert got == sorted(expected), trial


def test_get_from_rest_v1_behind_a_custom_domain_base_path(aws_resources: str, scorer: Scorer) -> None:
    """Behind a custom domain the REST ``path`` carries the base path mapping; routes still match."""
    service = _service(scorer)
    posted = json.loads(_post(service, elpv_image_bytes(3), "v1-1")["body"])
    event = rest_event("GET", "/cameras/cam-r/results/v1-1")
    event["path"] = "/inspection/cameras/cam-r/results/v1-1"
    response = service.handle(event, None)
    assert response["statusCode"] == 200 and json.loads(response["body"]) == posted
    listing = rest_event("GET", "/cameras/cam-r/results")
    listing["path"] = "/v1/cameras/cam-r/results"
    assert [r["request_id"] for r in json.loads(service.handle(listing, None)["body"])["results"]] == ["v1-1"]
