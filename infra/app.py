"""Synthesize the stage stacks: ``python -m infra.app [--stage dev] [--context KEY=VALUE ...]``.

Without ``--stage`` every stage in ``params.yaml: deploy.stages`` is synthesized. Templates go to
``build/cdk.out/<stack>.template.json`` (``--out`` to change). ``image_tag`` (or ``image_digest``)
must be given as context: it is the tag ``python -m release.publish`` pushed to ECR.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import aws_cdk as cdk

from infra.config import REPO_ROOT, ConfigError, StageConfig, load_stage, parse_context, stage_names
from infra.stack import InspectionStack

DEFAULT_OUT = REPO_ROOT / "build" / "cdk.out"


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


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 synthesized, 2 bad configuration (one line naming the knob)."""
    parser = argparse.ArgumentParser(prog="python -m infra.app", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", action="append", help="stage to synthesize (repeatable; default: all)")
    parser.add_argument("--context", "-c", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        context = parse_context(args.context)
        configs = [load_stage(stage, context) for stage in args.stage or stage_names()]
    except ConfigError as exc:
        print(f"infra: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    templates = synth_templates(configs, args.out)
    for name, template in templates.items():
        size = len(json.dumps(template, separators=(",", ":")))
        path = args.out / f"{name}.template.json"
        print(f"{name}: {path} ({len(template['Resources'])} resources, {size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
