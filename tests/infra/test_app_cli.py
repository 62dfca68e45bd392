"""The CDK app honours what the ``cdk`` CLI passes (``cdk.json``'s command, ``CDK_OUTDIR``, context),
so ``cdk synth/diff/deploy -c stage=prod -c image_tag=...`` work on the same stacks ``infra.deploy``
deploys. The CLI itself is not installed here; these tests run the app exactly as the CLI does:
``cdk.json``'s ``app`` command through a shell in the repository, with the CLI's environment."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from config.paths import REPO_ROOT as REPO
from infra.app import CONTEXT_ENV, CONTEXT_OVERFLOW_ENV, cli_context
from infra.config import ConfigError
from tests.infra.conftest import IMAGE_TAG, Synth


def run_like_cdk(
    outdir: Path, context: dict[str, Any], *, overflow: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """What ``cdk synth`` does: run cdk.json's app command in the project with CDK_OUTDIR + context."""
    app = json.loads((REPO / "cdk.json").read_text())["app"]
    env = {k: v for k, v in os.environ.items() if k not in (CONTEXT_ENV, CONTEXT_OVERFLOW_ENV)}
    env["CDK_OUTDIR"] = str(outdir)
    if overflow is not None:  # the CLI's route for a context too large for the environment
        overflow.write_text(json.dumps(context))
        env[CONTEXT_OVERFLOW_ENV] = str(overflow)
    else:
        env[CONTEXT_ENV] = json.dumps(context)
    return subprocess.run(app, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cdk_json_runs_the_app_into_cdk_outdir_with_cli_context(tmp_path: Path) -> None:
    cdk_json = json.loads((REPO / "cdk.json").read_text())
    assert cdk_json["app"].endswith("-m infra.app")
    assert cdk_json["requireApproval"] == "broadening"  # `cdk deploy` asks before IAM broadening
    context = {
        "stage": "prod",
        "image_tag": "v9-abc1234",
        "memory_mb": "4096",
        "alarm_5xx_min_requests": 50,  # cdk.json context values arrive as JSON, not strings
        "@aws-cdk/core:target-partitions": ["aws"],  # the CDK's own keys pass by
        "aws:cdk:enable-path-metadata": True,
    }
    proc = run_like_cdk(tmp_path / "cdk.out", context)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""  # stdout is the CLI's; the app's summary goes to stderr
    manifest = json.loads((tmp_path / "cdk.out" / "manifest.json").read_text())
    stacks = {k: v for k, v in manifest["artifacts"].items() if v["type"] == "aws:cloudformation:stack"}
    assert list(stacks) == ["visual-inspection-prod"]  # only the stage asked for
    assert stacks["visual-inspection-prod"]["properties"]["terminationProtection"] is True  # prod
    template = json.loads((tmp_path / "cdk.out" / "visual-inspection-prod.template.json").read_text())
    (function,) = [r for r in template["Resources"].values() if r["Properties"].get("PackageType") == "Image"]
    assert function["Properties"]["MemorySize"] == 4096
    assert ":v9-abc1234" in json.dumps(function["Properties"]["Code"])
    (alarm,) = [
        r
        for r in template["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and "Expression" in json.dumps(r)
    ]
    assert "requests >= 50" in json.dumps(alarm)


def test_cli_context_mistakes_are_one_line_before_synth(tmp_path: Path) -> None:
    proc = run_like_cdk(tmp_path / "out", {"stage": "dev", "image_tag": "t", "memroy_mb": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("infra: context memroy_mb: unknown knob")
    # The overflow file is read too (a bad value in it is reported, so it was read).
    bad = {"stage": "dev", "image_tag": "t", "timeout_s": "99"}
    proc = run_like_cdk(tmp_path / "out", bad, overflow=tmp_path / "ctx.json")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "infra: --context timeout_s: must be an integer from 1 to 29 (got 99)"
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_context_keeps_knobs_and_drops_the_cdks_own_keys() -> None:
    env = {"CDK_CONTEXT_JSON": json.dumps({"stage": "dev", "retain_data": False, "@aws-cdk/x:y": True})}
    assert cli_context(env) == {"stage": "dev", "retain_data": "false"}
    assert cli_context({}) == {}
    with pytest.raises(ConfigError, match="context stge: unknown knob"):
        cli_context({"CDK_CONTEXT_JSON": json.dumps({"stge": "dev"})})


def test_cdk_cli_synth_is_byte_for_byte_what_infra_deploy_deploys(synth: Synth, tmp_path: Path) -> None:
    """With cdk.json's settings (no version reporting, no path metadata, passed by the CLI as these
    context keys) ``cdk synth``/``cdk diff`` see exactly the template ``infra.deploy`` sends."""
    cdk_json = json.loads((REPO / "cdk.json").read_text())
    assert (cdk_json["versionReporting"], cdk_json["pathMetadata"]) == (False, False)
    context = {
        "stage": "prod",
        "image_tag": IMAGE_TAG,
        "aws:cdk:version-reporting": False,
        "aws:cdk:enable-path-metadata": False,
    }
    proc = run_like_cdk(tmp_path / "cdk.out", context)
    assert proc.returncode == 0, proc.stderr
    template = json.loads((tmp_path / "cdk.out" / "visual-inspection-prod.template.json").read_text())
    assert template == synth.template("prod")
