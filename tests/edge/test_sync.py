"""Exactly-once sync: the cloud down while 1,000 images flow, then back; retried syncs store nothing twice."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import boto3

from core.scoring import Scorer
from edge.outbox import PENDING, ROW_RESERVE
from serving.events import RequestLimits
from serving.service import InferenceService
from serving.storage import ResultStore
from tests.edge.conftest import BUCKET, TABLE, drop_file, tiny_png, wait_for
from tests.serving.conftest import rest_event
from tests.serving.fault_proxy import FaultProxy

ALL_OPERATIONS = (
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:ListObjectsV2",
    "dynamodb:PutItem",
    "dynamodb:GetItem",
    "dynamodb:UpdateItem",
)


def cloud_get(service: InferenceService, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
    """A GET through the Lambda's own handler (the REST v1 event API Gateway sends)."""
    event = rest_event("GET", f"{path}?{urlencode(query)}" if query else path)
    response = service.handle(event)
    assert response["statusCode"] == 200, response
    return json.loads(response["body"])


def cloud_results(service: InferenceService, camera: str) -> list[dict[str, Any]]:
    results, token = [], None
    while True:
        query = {"limit": "100", "regions": "true"}
        if token:
            query["next_token"] = token
        page = cloud_get(service, f"/cameras/{camera}/results", query)
        results += page["results"]
        token = page["next_token"]
        if not token:
            return results


def check_cloud_equals_local(
    outbox: Any, cameras: list[str], serving_model_dir: Path, *, agent_id: str, version: str
) -> dict[str, int]:
    """Cloud items = S3 result sets = local results; no duplicates, none missing, no stray object."""
    service = InferenceService(
        Scorer.from_dir(serving_model_dir), ResultStore(TABLE, BUCKET), RequestLimits()
    )
    local = {}
    for camera in cameras:
        entries, token = outbox.query(camera, since=None, until=None, limit=100_000, next_token=None)
        assert token is None
        local.update({(e.camera_id, e.request_id): e for e in entries})
    cloud = {}
    for camera in cameras:
        for result in cloud_results(service, camera):
            key = (result["camera_id"], result["request_id"])
            assert key not in cloud, f"duplicate cloud item {key}"
            cloud[key] = result
    assert set(cloud) == set(local)
    for key, entry in local.items():
        assert cloud[key]["score"] == entry.record.score
        assert cloud[key]["is_anomalous"] == entry.is_anomalous
    # Every S3 object belongs to exactly one item, and every item has its overlay and mask.
    dynamodb = boto3.client("dynamodb")
    items = []
    for page in dynamodb.get_paginator("scan").paginate(TableName=TABLE):
        items += page["Items"]
    assert all(i["status"]["S"] == "complete" for i in items)
    assert all(i["source"]["S"] == "edge" and i["agent_id"]["S"] == agent_id for i in items)
    assert all(i["model_version"]["S"] == version for i in items)
    referenced = {i[k]["S"] for i in items for k in ("overlay_key", "mask_key")}
    s3 = boto3.client("s3")
    objects = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        objects |= {o["Key"] for o in page.get("Contents", [])}
    assert objects == referenced, f"{len(objects - referenced)} stray, {len(referenced - objects)} missing"
    return {"local": len(local), "cloud": len(cloud), "objects": len(objects)}


def test_cloud_unreachable_while_1000_images_flow_then_back(
    cloud, make_config, agent_factory, tmp_path: Path, serving_model_dir: Path
) -> None:
    proxy = FaultProxy(cloud["endpoint_url"]).start()
    try:
        for operation in ALL_OPERATIONS:
            proxy.add(operation, "close_before", times=10**9)
        cameras = ["line-a", "line-b"]
        folders = {c: tmp_path / "in" / c for c in cameras}
        config = make_config(
            sources=[
                {"type": "folder", "camera_id": c, "path": str(p), "poll_s": 0.05} for c, p in folders.items()
            ],
            cloud={
                "table": TABLE,
                "bucket": BUCKET,
                "endpoint_url": proxy.url,
                "batch_size": 25,
                "workers": 2,
                "interval_s": 0.1,
                "backoff_initial_s": 0.1,
                "backoff_max_s": 0.5,
                "connect_timeout_s": 1,
                "read_timeout_s": 2,
            },
            queue={"max_depth": 16},
        )
        agent = agent_factory(config)
        started = time.monotonic()
        for i in range(1000):
            camera = cameras[i % 2]
            drop_file(folders[camera], f"img-{i:05d}.png", tiny_png(i))
        wait_for(lambda: agent.outbox.stats()["results"] == 1000, 120, "1000 results in the outbox", 0.2)
        scored_s = time.monotonic() - started
        stats = agent.outbox.stats()
        assert stats["pending"] == 1000 and stats["synced"] == 0
        assert agent.metrics.value("vi_edge_sync_failures_total") > 0
        assert not [f for p in folders.values() for f in p.glob("*.png")], (
            "every file is removed once durable"
        )
        assert proxy.fired(), "the agent must have tried the cloud while it was down"

        proxy.clear()  # the cloud is back
        synced_start = time.monotonic()
        wait_for(lambda: agent.outbox.stats()["pending"] == 0, 150, "the outbox to drain", 0.2)
        synced_s = time.monotonic() - synced_start
        counts = check_cloud_equals_local(
            agent.outbox, cameras, serving_model_dir, agent_id="test-agent", version=agent.models.live.version
        )
        assert counts == {"local": 1000, "cloud": 1000, "objects": 2000}
        print(
            f"scored 1000 in {scored_s:.1f} s offline; synced in {synced_s:.1f} s ({1000 / synced_s:.0f}/s)"
        )
    finally:
        proxy.stop()


def test_retried_sync_stores_nothing_twice(
    cloud, make_config, agent_factory, tmp_path: Path, serving_model_dir
):
    """Writes that land but whose answers are lost are retried: the cloud still holds each result once."""
    proxy = FaultProxy(cloud["endpoint_url"]).start()
    try:
        proxy.add("dynamodb:PutItem", "drop_after_write", times=3)
        proxy.add("s3:PutObject", "drop_after_write", times=3)
        proxy.add("dynamodb:PutItem", "error_after_write", times=2)
        folder = tmp_path / "in"
        config = make_config(
            sources=[{"type": "folder", "camera_id": "cam-r", "path": str(folder), "poll_s": 0.05}],
            cloud={
                "table": TABLE,
                "bucket": BUCKET,
                "endpoint_url": proxy.url,
                "interval_s": 0.05,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.2,
                "read_timeout_s": 2,
            },
        )
        agent = agent_factory(config)
        for i in range(30):
            drop_file(folder, f"r{i:03d}.png", tiny_png(5000 + i))
        wait_for(lambda: agent.outbox.stats()["synced"] == 30, 90, "30 synced", 0.1)
        proxy.wait_idle()
        assert len(proxy.fired()) == 8
        counts = check_cloud_equals_local(
            agent.outbox,
            ["cam-r"],
            serving_model_dir,
            agent_id="test-agent",
            version=agent.models.live.version,
        )
        assert counts == {"local": 30, "cloud": 30, "objects": 60}
    finally:
        proxy.stop()


def test_sync_keeps_camera_order(cloud, make_config, tmp_path: Path) -> None:
    """A camera's results reach the cloud in commit order even when an early one fails first."""
    from edge.agent import Agent

    config = make_config(
        cloud={
            "table": TABLE,
            "bucket": BUCKET,
            "endpoint_url": cloud["endpoint_url"],
            "batch_size": 4,
            "workers": 1,
        }
    )
    agent = Agent(config)
    agent.models.start()
    from edge.jobs import Job, make_request

    for i in range(10):
        request = make_request(
            "cam-o",
            tiny_png(i),
            request_id=f"o-{i:02d}",
            captured_at="2026-01-01T00:00:00.000Z",
            limits=agent.limits,
        )
        assert agent.process(Job(request=request, source="http", done=lambda r: None)).entry is not None
    order: list[str] = []
    original = agent.syncer.store.save

    def recording_save(record, *args, **kwargs):
        order.append(record.request_id)
        if record.request_id == "o-01" and order.count("o-01") == 1:
            from serving.storage import StorageError

            raise StorageError("dynamodb", "put_item", "injected", retryable=True)
        return original(record, *args, **kwargs)

    agent.syncer.store.save = recording_save
    while agent.outbox.stats()["pending"]:
        agent.syncer.sync_once()
    assert order == ["o-00", "o-01", *[f"o-{i:02d}" for i in range(1, 10)]]
    assert [e.sync_state for e in agent.outbox.pending(100)] == []
    assert agent.outbox.get("cam-o", "o-01").sync_state != PENDING
    agent.outbox.close()


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    import random

    from edge.sync import backoff_delay

    rng = random.Random(0)
    assert backoff_delay(0, 1.0, 60.0, rng) == 0.0
    for failures, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (40, 60.0)):
        delays = [backoff_delay(failures, 1.0, 60.0, rng) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len({round(d, 6) for d in delays}) > 150, "jittered, not one fixed delay"


def test_full_outbox_backpressures_the_folder_until_sync_frees_space(
    cloud, make_config, agent_factory, tmp_path: Path, serving_model_dir: Path
) -> None:
    """Cloud down, cap reached: files wait in the folder; cloud back: synced files go, the rest flows."""
    proxy = FaultProxy(cloud["endpoint_url"]).start()
    try:
        for operation in ALL_OPERATIONS:
            proxy.add(operation, "close_before", times=10**9)
        folder = tmp_path / "in"
        config = make_config(
            sources=[{"type": "folder", "camera_id": "cam-d", "path": str(folder), "poll_s": 0.05}],
            outbox={"max_bytes": "2500K"},
            cloud={
                "table": TABLE,
                "bucket": BUCKET,
                "endpoint_url": proxy.url,
                "interval_s": 0.05,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.2,
                "connect_timeout_s": 1,
                "read_timeout_s": 2,
            },
        )
        agent = agent_factory(config)
        for i in range(40):
            drop_file(folder, f"d{i:03d}.png", tiny_png(9000 + i, 160))
        wait_for(lambda: agent.outbox.stats().get("refused_full", 0) >= 1, 60, "the cap to be reached", 0.1)
        waiting = len(list(folder.glob("*.png")))
        assert waiting > 0, "refused files stay in the folder"
        stored = agent.outbox.stats()["results"]
        assert stored + waiting == 40
        assert agent.outbox.stats()["bytes"] <= 2500 * 1024 + ROW_RESERVE

        proxy.clear()
        wait_for(lambda: agent.outbox.stats()["synced"] == 40, 120, "all 40 stored and synced", 0.2)
        assert not list(folder.glob("*.png"))
        stats = agent.outbox.stats()
        assert stats["evicted_synced_files"] > 0
        counts = check_cloud_equals_local(
            agent.outbox,
            ["cam-d"],
            serving_model_dir,
            agent_id="test-agent",
            version=agent.models.live.version,
        )
        assert counts["cloud"] == 40 and counts["local"] == 40
    finally:
        proxy.stop()
