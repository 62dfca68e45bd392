"""Model follow: A/B slots, sha256 + input size + parity checks, atomic switch, rollback, restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest

from core.files import sha256_file
from core.scoring import ScoringError
from edge.agent import Agent
from edge.config import ModelConfig
from edge.jobs import Job, make_request
from edge.metrics import Metrics
from edge.models import ModelManager, ModelRejected
from tests.edge.conftest import tiny_png


def publish(champion: Path, out: Path, version: str, **metadata_changes: object) -> Path:
    """A new publication of the champion: the ONNX re-serialised with a tag (new sha256), new version."""
    import onnx

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(champion, out)
    model = onnx.load(str(out / "model.onnx"))
    tag = model.metadata_props.add()
    tag.key, tag.value = "publication", version
    onnx.save(model, str(out / "model.onnx"))
    meta = json.loads((out / "metadata.json").read_text())
    meta.update(model_sha256=sha256_file(out / "model.onnx"), registry_version=version, **metadata_changes)
    (out / "metadata.json").write_text(json.dumps(meta))
    return out


def manager(root: Path, **config: object) -> ModelManager:
    return ModelManager(root, ModelConfig(**config), metrics=Metrics())  # type: ignore[arg-type]


def test_follow_switches_slots_atomically_and_results_name_their_version(make_config, champion_dir, tmp_path):
    published = tmp_path / "published"
    shutil.copytree(champion_dir, published)
    agent = Agent(make_config(model={"dir": str(champion_dir), "follow": str(published), "poll_s": 0.05}))
    try:
        agent.models.start()
        agent.models.poll()
        first = agent.models.live
        assert (first.version, first.slot) == ("0", "a")

        def version_of_next_result(i: int) -> str:
            request = make_request(
                "cam-m",
                tiny_png(i),
                request_id=f"m-{i}",
                captured_at="2026-01-01T00:00:00Z",
                limits=agent.limits,
            )
            return agent.process(
                Job(request=request, source="http", done=lambda r: None)
            ).entry.record.model_version

        assert version_of_next_result(1) == "0"
        publish(champion_dir, published, "7")
        agent.models.poll()
        assert (agent.models.live.version, agent.models.live.slot) == ("7", "b")
        assert version_of_next_result(2) == "7"
        assert json.loads((agent.config.state_dir / "models" / "current.json").read_text())["slot"] == "b"
        assert (agent.config.state_dir / "models" / "a" / "metadata.json").is_file(), "the old slot is kept"
        agent.models.poll()  # same publication again: nothing happens
        assert agent.metrics.value("vi_edge_model_updates_total") == 2
    finally:
        agent.outbox.close()


def test_truncated_download_wrong_input_size_and_parity_failure_are_rejected(champion_dir, tmp_path):
    models = manager(tmp_path / "models", dir=champion_dir)
    models.start()
    live = models.live

    truncated = publish(champion_dir, tmp_path / "p1", "8")
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])  # a publisher still copying
    with pytest.raises(ModelRejected, match="sha256"):
        models.install(str(truncated))
    assert models.live is live and not list((tmp_path / "models").glob("b*")), "never staged as usable"
    (truncated / "model.onnx").write_bytes(data)  # the copy completes: the next poll installs it
    assert models.install(str(truncated)).version == "8"
    live = models.live
    corrupt = publish(champion_dir, tmp_path / "p1c", "8c")
    (corrupt / "model.onnx").write_bytes(b"\0" * 1000)  # corrupt for good
    for _ in range(3):
        with pytest.raises(ModelRejected, match="sha256"):
            models.install(str(corrupt))

    wrong_size = publish(champion_dir, tmp_path / "p2", "9")
    meta = json.loads((wrong_size / "metadata.json").read_text())
    meta["input"].update(height=32, width=32)
    (wrong_size / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelRejected, match="input shape"):
        models.install(str(wrong_size))

    drifted = publish(champion_dir, tmp_path / "p3", "10")
    reference = json.loads((drifted / "reference.json").read_text())
    reference["images"][0]["score"] += 0.01
    (drifted / "reference.json").write_text(json.dumps(reference))
    with pytest.raises(ModelRejected, match="scores"):
        models.install(str(drifted))

    no_reference = publish(champion_dir, tmp_path / "p4", "11")
    (no_reference / "reference.json").unlink()
    with pytest.raises(ModelRejected, match="reference"):
        models.install(str(no_reference))

    assert models.live is live, "the live model never changed"
    assert len(models.rejected) == 4
    assert models.install(str(corrupt)) is None, "a rejected publication is not tried again"
    good = publish(champion_dir, tmp_path / "p5", "12")
    assert models.install(str(good)).version == "12"


def test_rollback_after_consecutive_scoring_failures(make_config, champion_dir, tmp_path):
    agent = Agent(make_config(model={"dir": str(champion_dir), "rollback_after_errors": 3}))
    try:
        agent.models.start()
        agent.models.install(str(publish(champion_dir, tmp_path / "pub", "5")))
        bad = agent.models.live
        assert bad.version == "5"

        def broken(*_args, **_kwargs):
            raise ScoringError("model output 'pred_score' is not one finite number: nan")

        bad.scorer.score = broken
        errors = []
        for i in range(3):
            request = make_request(
                "cam-r",
                tiny_png(i),
                request_id=f"r-{i}",
                captured_at="2026-01-01T00:00:00Z",
                limits=agent.limits,
            )
            errors.append(agent.process(Job(request=request, source="http", done=lambda r: None)).error)
        assert all(isinstance(e, ScoringError) for e in errors)
        assert (agent.models.live.version, agent.models.live.slot) == ("0", "a")
        assert bad.digest in agent.models.rejected
        assert agent.metrics.value("vi_edge_model_rollbacks_total") == 1
        request = make_request(
            "cam-r", tiny_png(9), request_id="r-9", captured_at="2026-01-01T00:00:00Z", limits=agent.limits
        )
        assert (
            agent.process(Job(request=request, source="http", done=lambda r: None)).entry.record.model_version
            == "0"
        )
    finally:
        agent.outbox.close()


def test_restart_uses_the_other_slot_when_the_live_one_is_damaged(champion_dir, tmp_path):
    root = tmp_path / "models"
    first = manager(root, dir=champion_dir)
    first.start()
    first.install(str(publish(champion_dir, tmp_path / "pub", "3")))
    assert first.live.slot == "b"
    model = root / "b" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # a disk fault after the switch
    again = manager(root, dir=champion_dir)
    again.start()
    assert (again.live.slot, again.live.version) == ("a", "0")


def test_follows_a_champion_published_to_s3(aws_env, champion_dir, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    published = publish(champion_dir, tmp_path / "pub", "21")
    for path in published.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "models", f"models/champion/{path.relative_to(published)}")
    models = manager(tmp_path / "models", dir=champion_dir, follow="s3://models/models/champion/")
    models.start()
    models.poll()
    assert models.live.version == "21"
    assert models.last_check["ok"] is True
