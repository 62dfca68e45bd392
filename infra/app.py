"""Synthesize the stage stacks: ``python -m infra.app [--stage dev] [--context KEY=VALUE ...]``.

Without ``--stage`` every stage in ``params.yaml: deploy.stages`` is synthesized. Templates go to
``build/cdk.out/<stack>.template.json`` (``--out`` to change). ``image_tag`` (or ``image_digest``)
must be given as context: it is the tag ``python -m release.publish`` pushed to ECR.

The same app is the ``cdk`` CLI's (``cdk.json``): ``cdk synth|diff|deploy -c stage=dev -c
image_tag=<tag> [-c KEY=VALUE ...]``. The CLI passes its output folder in ``CDK_OUTDIR`` and the
context (``-c``, ``cdk.json``, ``cdk.context.json``) in ``CDK_CONTEXT_JSON`` (or a file named by
``CONTEXT_OVERFLOW_LOCATION_ENV``); both are honoured, so ``cdk diff`` shows the IAM changes of exactly
the stack ``infra.deploy`` would deploy. Context keys are the knobs of ``params.yaml: deploy`` plus
``stage``; a key that is neither (and not the CDK's own: ``@...`` or ``aws:...``) is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk

from infra.config import (
    REPO_ROOT,
    ConfigError,
    StageConfig,
    knob_names,
    load_stage,
    parse_context,
    stage_names,
)
from infra.stack import InspectionStack

DEFAULT_OUT = REPO_ROOT / "build" / "cdk.out"
# What the cdk CLI sets for the app it runs (aws-cdk-lib's cx-api names).
OUTDIR_ENV = "CDK_OUTDIR"
CONTEXT_ENV = "CDK_CONTEXT_JSON"
CONTEXT_OVERFLOW_ENV = "CONTEXT_OVERFLOW_LOCATION_ENV"


def build_app(
    configs: list[StageConfig], outdir: Path | None = None
) -> tuple[cdk.App, list[InspectionStack]]:
    """One CDK app holding one stack per config (the stacks are independent)."""
    app = cdk.App(outdir=str(outdir) if outdir else None)
    return app, [InspectionStack(app, config) for config in configs]


def synth_templates(configs: list[StageConfig], outdir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Synthesize and return ``{stack name: CloudFormation template}``; files land in ``outdir``."""
    with tempfile.TemporaryDirectory(prefix="cdk-out-") as tmp:
        app, stacks = build_app(configs, outdir or Path(tmp))
        assembly = app.synth()
        return {stack.stack_name: assembly.get_stack_by_name(stack.stack_name).template for stack in stacks}


def _is_cdk_internal(key: str) -> bool:
    """Feature flags (``@aws-cdk/...``) and CLI settings (``aws:cdk:...``) are the CDK's, not knobs."""
    return key.startswith("@") or ":" in key


def cli_context(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The knobs (and ``stage``) in the context the cdk CLI passed; unknown keys are refused."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if env.get(CONTEXT_OVERFLOW_ENV):
        raw = json.loads(Path(env[CONTEXT_OVERFLOW_ENV]).read_text())
    elif env.get(CONTEXT_ENV):
        raw = json.loads(env[CONTEXT_ENV])
    known = set(knob_names()) | {"stage"}
    context = {}
    for key, value in raw.items():
        if _is_cdk_internal(key):
            continue
        if key not in known:
            raise ConfigError(f"context {key}: unknown knob (known: {sorted(known)})")
        context[key] = value if isinstance(value, str) or value is None else json.dumps(value)
    return context


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 synthesized, 2 bad configuration (one line naming the knob)."""
    parser = argparse.ArgumentParser(prog="python -m infra.app", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", action="append", help="stage to synthesize (repeatable; default: all)")
    parser.add_argument("--context", "-c", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help=f"default: $CDK_OUTDIR or {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    outdir = args.out or Path(os.environ.get(OUTDIR_ENV) or DEFAULT_OUT)
    try:
        context = {**cli_context(), **parse_context(args.context)}
        given_stage = context.pop("stage", None)
        stages = args.stage or ([given_stage] if given_stage else stage_names())
        configs = [load_stage(stage, context) for stage in stages]
    except ConfigError as exc:
        print(f"infra: {exc}", file=sys.stderr)
        return 2
    outdir.mkdir(parents=True, exist_ok=True)
    templates = synth_templates(configs, outdir)
    for name, template in templates.items():
        size = len(json.dumps(template, separators=(",", ":")))
        path = outdir / f"{name}.template.json"
        # stderr: under the cdk CLI, stdout is the CLI's
        print(f"{name}: {path} ({len(template['Resources'])} resources, {size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
