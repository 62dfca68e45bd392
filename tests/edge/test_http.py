"""The agent's HTTP API: the cloud's routes and errors, replay/conflict, 429 when behind, 507 when full."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

from tests.edge.conftest import tiny_png, wait_for


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def post(
    port: int, camera: str, data: bytes, key: str | None = None, query: str = ""
) -> tuple[int, dict, Any]:
    headers = {"content-type": "image/png", **({"idempotency-key": key} if key else {})}
    status, response_headers, body = call(port, "POST", f"/cameras/{camera}/images{query}", data, headers)
    return status, {k.lower(): v for k, v in response_headers.items()}, json.loads(body)


def test_routes_replay_conflict_and_errors_match_the_cloud(make_config, agent_factory) -> None:
    agent = agent_factory(make_config())
    port = agent.http.port
    status, headers, first = post(port, "cam-1", tiny_png(1), key="k-1")
    assert status == 200 and headers["x-idempotent-replay"] == "false"
    assert first["request_id"] == "k-1" and first["result_uri"] == "edge://test-agent/cam-1/k-1"
    status, headers, again = post(port, "cam-1", tiny_png(1), key="k-1")
    assert status == 200 and headers["x-idempotent-replay"] == "true" and again == first
    status, _, conflict = post(port, "cam-1", tiny_png(2), key="k-1")
    assert status == 409 and conflict["error"]["code"] == "idempotency_conflict"
    status, _, bad = post(port, "cam-1", b"not an image", key="k-2")
    assert status == 422 and bad["error"]["code"] == "invalid_image"

    status, _, raw = call(port, "GET", "/cameras/cam-1/results/k-1?mask=base64&regions=true")
    one = json.loads(raw)
    assert status == 200 and one["score"] == first["score"] and one["mask"]["format"] == "png"
    status, _, raw = call(port, "GET", one_url := "/cameras/cam-1/results/k-1?mask=url")
    assert status == 200, one_url
    status, headers, png = call(port, "GET", json.loads(raw)["mask"]["url"])
    assert status == 200 and png.startswith(b"\x89PNG")
    status, _, raw = call(port, "GET", "/cameras/cam-1/results?limit=10")
    assert status == 200 and [r["request_id"] for r in json.loads(raw)["results"]] == ["k-1"]
    status, _, raw = call(port, "GET", "/cameras/cam-1/results/nope")
    assert status == 404 and json.loads(raw)["error"]["code"] == "result_not_found"
    status, _, _ = call(port, "GET", "/nowhere")
    assert status == 404
    # The Lambda's parsers and route answers: a non-ASCII digit is the limit's 400, another method 405.
    status, _, raw = call(port, "GET", "/cameras/cam-1/results?limit=%C2%B2")
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_limit"
    status, headers, raw = call(
        port, "POST", "/cameras/cam-1/results", b"{}", {"content-type": "application/json"}
    )
    assert (
        status == 405
        and json.loads(raw)["error"]["code"] == "method_not_allowed"
        and headers["Allow"] == "GET"
    )


def test_busy_scorer_answers_429_with_retry_after(make_config, agent_factory, caplog) -> None:
    agent = agent_factory(make_config(queue={"max_depth": 1}))
    port = agent.http.port
    release = threading.Event()
    real_process = agent.process

    def slow_process(job):
        release.wait(30)
        return real_process(job)

    agent.process = slow_process
    results: list[int] = []
    workers = [
        threading.Thread(target=lambda i=i: results.append(post(port, "cam-b", tiny_png(i), f"b-{i}")[0]))
        for i in range(2)
    ]
    try:
        for taken, worker in enumerate(workers, 1):  # one is being scored (blocked), one waits in the queue
            worker.start()
            wait_for(lambda n=taken: agent.queue.unfinished_tasks == n, 10, f"{taken} jobs taken", 0.01)
        status, headers, body = post(port, "cam-b", tiny_png(9), "b-9")
    finally:
        if agent.queue.qsize() == 0:
            release.set()
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["code"] == "busy"
    release.set()
    for worker in workers:
        worker.join(30)
    assert sorted(results) == [200, 200]
    assert agent.metrics.value("vi_edge_backpressure_total", {"source": "http"}) == 1
    logged = [r for r in caplog.records if r.name == "edge.agent" and "backpressure" in r.getMessage()]
    assert len(logged) == 1 and logged[0].source == "http"


def test_full_outbox_answers_507_and_keeps_every_verdict(make_config, agent_factory) -> None:
    agent = agent_factory(make_config(outbox={"max_bytes": 1}))
    status, headers, body = post(agent.http.port, "cam-x", tiny_png(1), "x-1")
    assert status == 507 and body["error"]["code"] == "outbox_full" and headers["retry-after"] == "1"
    assert agent.outbox.stats()["refused_full"] == 1


def test_status_metrics_and_health(make_config, agent_factory) -> None:
    agent = agent_factory(make_config())
    port = agent.http.port
    post(port, "cam-s", tiny_png(1), "s-1")
    status, _, raw = call(port, "GET", "/status")
    described = json.loads(raw)
    assert status == 200
    assert described["model"]["version"] == "0" and described["model"]["slot"] == "a"
    assert described["queue"] == {"depth": 0, "capacity": 8}
    assert described["outbox"]["results"] == 1 and described["outbox"]["pending"] == 1
    assert described["counters"]["vi_edge_scored_total"] == 1
    status, _headers, text = call(port, "GET", "/metrics")
    lines = text.decode().splitlines()
    assert status == 200 and "# TYPE vi_edge_scored_total counter" in lines
    assert 'vi_edge_scored_total{camera_id="cam-s",source="http"} 1' in lines
    assert "vi_edge_outbox_pending 1" in lines and "vi_edge_queue_capacity 8" in lines
    assert any(line.startswith('vi_edge_model_version_info{slot="a",version="0"}') for line in lines)
    assert call(port, "GET", "/healthz")[0] == 200
