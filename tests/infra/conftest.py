"""Synthesized templates for the infra tests, built once per session (each synth starts a jsii
Node process and takes ~10-20 s on two cores, so every test reads these three)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest

IMAGE_TAG = "v7-abc1234"


@dataclass(frozen=True)
class Synth:
    """``configs`` by label (``dev``, ``prod``, ``full``) and their templates."""

    configs: dict[str, Any]
    templates: dict[str, dict[str, Any]]

    def template(self, label: str) -> dict[str, Any]:
        return self.templates[self.configs[label].stack_name]


@pytest.fixture(scope="session")
def synth() -> Synth:
    """Every stage of params.yaml with its defaults, plus ``full``: every optional feature on
    (retention/TTL, alarm e-mail, provisioned concurrency, arm64, originals kept, other prefix,
    explicit throttle, no account logging role)."""
    import shutil

    if shutil.which("node") is None:  # jsii runs the CDK's JavaScript in Node.js
        pytest.fail("Node.js (>= 20) is not on PATH: aws-cdk-lib needs it (apt-get install nodejs)")
    from infra.app import synth_templates
    from infra.config import load_stage, stage_names

    configs = {stage: load_stage(stage, {"image_tag": IMAGE_TAG}) for stage in stage_names()}
    configs["full"] = replace(
        load_stage("dev", {"image_digest": "sha256:" + "ab" * 32}),
        stage="full",
        retention_days=30,
        alarm_email="ops@example.com",
        provisioned_concurrency=2,
        reserved_concurrency=4,
        architecture="arm64",
        store_original=True,
        results_prefix="inspections/line-1/",
        retain_data=True,
        throttle_rate=2.5,  # explicit overrides, lower than derived (4 / 0.6 s x 0.8 = 5.3/s, burst 4)
        throttle_burst=3,
        alarm_5xx_min_requests=7,
        access_log_retention_days=731,
        api_cloudwatch_role=False,  # the account already has API Gateway's logging role
        termination_protection=True,
        reconcile_grace_hours=None,  # no reconciler (dev and prod have one)
    ).validate()
    return Synth(configs, synth_templates(list(configs.values())))
