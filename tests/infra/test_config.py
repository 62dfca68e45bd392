"""Stage knobs: params.yaml → context overrides → one validated config, or one line naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from config.paths import REPO_ROOT as REPO
from infra.config import MAX_DELIVERABLE_BODY_BYTES, ConfigError, load_stage, parse_context, stage_names
from serving.events import RequestLimits


def test_every_stage_loads_and_context_overrides_params() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert stage_names() == sorted(params["deploy"]["stages"]) and {"dev", "prod"} <= set(stage_names())
    prod = load_stage("prod", {"image_tag": "v1-abc"})
    assert prod.memory_mb == params["deploy"]["stages"]["prod"]["memory_mb"]
    assert prod.stack_name == f"{params['registry']['model_name']}-prod"
    context = {
        "image_tag": "v1-abc",
        "memory_mb": "4096",
        "architecture": "arm64",
        "store_original": "true",
        "reserved_concurrency": "null",
        "throttle_rate": "30",  # without reserved concurrency there is nothing to derive from
        "throttle_burst": "10",
    }
    tuned = load_stage("prod", context)
    assert (tuned.memory_mb, tuned.architecture, tuned.store_original) == (4096, "arm64", True)
    assert tuned.reserved_concurrency is None
    assert tuned.stage_throttle == (30.0, 10)
    assert tuned.docker_platform == "linux/arm64"


def test_payload_limit_fits_what_api_gateway_can_hand_to_lambda() -> None:
    # 6 MB of event JSON, binary bodies base64-encoded (4/3): the decoded image must be smaller.
    assert MAX_DELIVERABLE_BODY_BYTES * 4 / 3 < 6 * 1024 * 1024
    for stage in stage_names():
        assert load_stage(stage, {"image_tag": "t"}).max_body_bytes <= MAX_DELIVERABLE_BODY_BYTES
    # The handler's own default (6 MB) would promise uploads the API cannot deliver: refused.
    with pytest.raises(ConfigError, match="max_body_bytes"):
        load_stage("dev", {"image_tag": "t", "max_body_bytes": str(RequestLimits().max_body_bytes)})


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({}, "no image: pass --context image_tag="),
        ({"image_tag": "a", "image_digest": "sha256:" + "0" * 64}, "not both"),
        ({"image_digest": "sha256:xyz"}, "expected sha256:<64 hex digits>"),
        ({"image_tag": "bad tag"}, "not a valid Docker tag"),
        (
            {"image_tag": "t", "memory_mb": "lots"},
            "--context memory_mb: must be an integer from 128 to 10240 (got 'lots')",
        ),
        (
            {"image_tag": "t", "timeout_s": "60"},
            "--context timeout_s: must be an integer from 1 to 29 (got 60)",
        ),
        (
            {"image_tag": "t", "architecture": "riscv"},
            "architecture: must be one of x86_64, arm64 (got 'riscv')",
        ),
        ({"image_tag": "t", "provisioned_concurrency": "9", "reserved_concurrency": "2"}, "exceeds reserved"),
        (
            {"image_tag": "t", "log_retention_days": "10"},
            "log_retention_days: must be one of CloudWatch's retention periods",
        ),
        ({"image_tag": "t", "results_prefix": "../x"}, "results_prefix"),
        (
            {"image_tag": "t", "alarm_email": "nobody"},
            "alarm_email: must be null or an e-mail address (got 'nobody')",
        ),
        (
            {"image_tag": "t", "store_original": "maybe"},
            "store_original: must be true or false (got 'maybe')",
        ),
        ({"image_tag": "t", "memroy_mb": "1"}, "memroy_mb: unknown knob"),
        ({"image_tag": "t", "throttle_rate": "100"}, "throttle_rate 100 exceeds what reserved_concurrency 5"),
        ({"image_tag": "t", "throttle_burst": "6"}, "throttle_burst 6 exceeds reserved_concurrency 5"),
        ({"image_tag": "t", "reserved_concurrency": "null"}, "stage throttle cannot be derived"),
        (
            {"image_tag": "t", "throttle_safety_factor": "1.5"},
            "throttle_safety_factor: must be a number from 0.1 to 1 (got 1.5)",
        ),
        (
            {"image_tag": "t", "access_log_retention_days": "2"},
            "access_log_retention_days: must be one of CloudWatch's retention periods",
        ),
        (
            {"image_tag": "t", "termination_protection": "sure"},
            "termination_protection: must be true or false (got 'sure')",
        ),
        (
            {"image_tag": "t", "reconcile_grace_hours": "0.5"},
            "reconcile_grace_hours: must be null or a number from 1 to 8760 (got 0.5)",
        ),
        (
            {"image_tag": "t", "reconcile_every_hours": "0"},
            "reconcile_every_hours: must be an integer from 1 to 168 (got 0)",
        ),
    ],
)
def test_bad_knobs_are_one_line_naming_the_fix(context: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_stage("dev", context)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_stage_throttle_is_what_the_reserved_instances_serve() -> None:
    """Overload must be API Gateway's 429: rate = reserved / latency x safety, burst = reserved."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())["deploy"]
    assert params["defaults"]["throttle_rate"] is None and params["defaults"]["throttle_burst"] is None
    dev, prod = (load_stage(stage, {"image_tag": "t"}) for stage in ("dev", "prod"))
    assert dev.request_latency_ms == prod.request_latency_ms == params["defaults"]["request_latency_ms"]
    assert (dev.reserved_concurrency, dev.stage_throttle) == (5, (6.6, 5))  # 5 / 0.6 s x 0.8 = 6.67
    assert (prod.reserved_concurrency, prod.stage_throttle) == (50, (66.6, 50))
    slower = load_stage("prod", {"image_tag": "t", "request_latency_ms": "2000"})
    assert slower.stage_throttle == (20.0, 50)  # 50 / 2 s x 0.8
    lower = load_stage("dev", {"image_tag": "t", "throttle_rate": "2", "throttle_burst": "3"})
    assert lower.stage_throttle == (2.0, 3)  # an override may throttle harder
    tiny = load_stage("dev", {"image_tag": "t", "reserved_concurrency": "1", "request_latency_ms": "5000"})
    assert tiny.stage_throttle == (1.0, 1)  # API Gateway's floor: at least 1 request/s
    assert prod.termination_protection and not dev.termination_protection


def test_unknown_stage_and_bad_context_syntax() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown stage 'qa': params.yaml deploy.stages has \['dev', 'prod'\]"
    ):
        load_stage("qa", {"image_tag": "t"})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_context(["memory_mb"])


def test_synth_cli_refuses_without_an_image_before_synthesizing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "infra.app", "--stage", "dev", "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("infra: no image: pass --context image_tag=")
    assert not (tmp_path / "out").exists()


def test_deploy_dry_run_prints_a_synth_command_that_reproduces_the_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from infra.app import main as synth_main
    from infra.deploy import main as deploy_main

    argv = [
        "--stage",
        "prod",
        "--image-tag",
        "v3-abc1234",
        "-c",
        "memory_mb=4096",
        "-c",
        "alarm_email=a@b.io",
    ]
    assert deploy_main([*argv, "--dry-run"]) == 0
    synth_line, deploy_line = capsys.readouterr().out.strip().splitlines()
    assert synth_line == (
        "synth visual-inspection-prod: python -m infra.app --stage prod --context image_tag=v3-abc1234 "
        "--context memory_mb=4096 --context alarm_email=a@b.io"
    )
    assert deploy_line.startswith("deploy visual-inspection-prod to <AWS region from the environment>")
    # The printed command's arguments give the same config (parsed here without synthesizing).
    words = synth_line.split(": ", 1)[1].split()[3:]
    pairs = [words[i + 1] for i in range(2, len(words), 2)]
    assert load_stage("prod", parse_context(pairs)) == load_stage(
        "prod", {"image_tag": "v3-abc1234", "memory_mb": "4096", "alarm_email": "a@b.io"}
    )
    assert deploy_main(["--stage", "prod", "--dry-run"]) == 2
    assert "no image" in capsys.readouterr().err
    assert synth_main(["--stage", "prod", "-c", "image_tag=t", "-c", "timeout_s=99"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "infra: --context timeout_s: must be an integer from 1 to 29 (got 99)"
    )
