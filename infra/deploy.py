"""Deploy one stage: synthesize its stack for an image tag, then a CloudFormation change set.

``python -m infra.deploy --stage dev --image-tag v3-abc1234 [--region R] [--context K=V] [--dry-run]``
(normally run by ``python -m release.publish``, which pushes the image first and passes its tag).

Why plain CloudFormation and not ``cdk deploy``: the stack has no assets (the image is already in
ECR) and uses the bootstrapless synthesizer, so no CDK CLI, no ``cdk bootstrap`` and no staging
bucket are needed; boto3 is. Change sets make a deploy that changes nothing a no-op, and a failed
update is rolled back by CloudFormation, so a fault never leaves a half-updated stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from infra.config import ConfigError, StageConfig, describe, load_stage, parse_context

# CloudFormation's limit for an inline TemplateBody (larger templates must come from S3).
MAX_TEMPLATE_BODY_BYTES = 51_200
CAPABILITIES = ["CAPABILITY_IAM"]
_NO_CHANGES = ("didn't contain changes", "No updates are to be performed", "No changes")


class DeployError(RuntimeError):
    """The deploy failed or was refused; the message names the stack, the cause and the fix."""


@dataclass(frozen=True)
class DeployResult:
    """What a deploy did: ``created``/``updated``/``unchanged`` and the stack outputs."""

    stack_name: str
    action: str
    outputs: dict[str, str]


def template_body(template: dict[str, Any]) -> str:
    """Compact JSON, refused early if CloudFormation would reject it for size."""
    body = json.dumps(template, separators=(",", ":"), sort_keys=True)
    if len(body) > MAX_TEMPLATE_BODY_BYTES:
        raise DeployError(
            f"template is {len(body)} bytes; CloudFormation accepts {MAX_TEMPLATE_BODY_BYTES} inline "
            "(remove dashboard widgets or routes, or deploy with `cdk deploy` which uploads it)"
        )
    return body


def stack_status(cfn: Any, stack_name: str) -> str | None:
    """The stack's status, or ``None`` if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return cfn.describe_stacks(StackName=stack_name)["Stacks"][0]["StackStatus"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise


def _failure_reasons(cfn: Any, stack_name: str, limit: int = 5) -> str:
    events = cfn.describe_stack_events(StackName=stack_name).get("StackEvents", [])
    reasons = [
        f"{e['LogicalResourceId']} ({e['ResourceType']}): {e.get('ResourceStatusReason', '')}"
        for e in events
        if e.get("ResourceStatus", "").endswith("FAILED")
    ]
    return "; ".join(reasons[:limit]) or "no failure events recorded"


def _wait(
    probe: Callable[[], tuple[str, str]],
    done: Callable[[str], bool],
    *,
    what: str,
    timeout: float,
    poll: float,
) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        status, reason = probe()
        if done(status):
            return status, reason
        if time.monotonic() > deadline:
            raise DeployError(f"{what} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def deploy_template(
    cfn: Any,
    stack_name: str,
    template: dict[str, Any],
    *,
    tags: dict[str, str] | None = None,
    timeout: float = 3600,
    poll: float = 5.0,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> DeployResult:
    """Create or update ``stack_name`` to ``template`` through a change set and wait for it."""
    body = template_body(template)
    status = stack_status(cfn, stack_name)
    if status == "ROLLBACK_COMPLETE":
        raise DeployError(
            f"stack {stack_name} is ROLLBACK_COMPLETE (its first create failed) and cannot be updated: "
            f"delete it (aws cloudformation delete-stack --stack-name {stack_name}) and deploy again"
        )
    if status and status.endswith("_IN_PROGRESS"):
        raise DeployError(f"stack {stack_name} is busy ({status}); wait for it to finish and deploy again")
    change_type = "CREATE" if status in (None, "REVIEW_IN_PROGRESS") else "UPDATE"
    name = f"deploy-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    log(f"{stack_name}: {change_type.lower()} change set {name}")
    change_set = cfn.create_change_set(
        StackName=stack_name,
        ChangeSetName=name,
        ChangeSetType=change_type,
        TemplateBody=body,
        Capabilities=CAPABILITIES,
        Tags=[{"Key": k, "Value": v} for k, v in sorted((tags or {}).items())],
    )
    change_set_id = change_set["Id"]

    def change_set_state() -> tuple[str, str]:
        cs = cfn.describe_change_set(ChangeSetName=change_set_id, StackName=stack_name)
        return cs["Status"], cs.get("StatusReason", "")

    cs_status, reason = _wait(
        change_set_state,
        lambda s: s in ("CREATE_COMPLETE", "FAILED"),
        what=f"change set {name}",
        timeout=600,
        poll=poll,
    )
    if cs_status == "FAILED":
        cfn.delete_change_set(ChangeSetName=change_set_id, StackName=stack_name)
        if any(marker in reason for marker in _NO_CHANGES):
            log(f"{stack_name}: no changes")
            return DeployResult(stack_name, "unchanged", stack_outputs(cfn, stack_name))
        raise DeployError(f"change set for {stack_name} failed: {reason}")

    cfn.execute_change_set(ChangeSetName=change_set_id, StackName=stack_name)

    def stack_state() -> tuple[str, str]:
        stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
        return stack["StackStatus"], stack.get("StackStatusReason", "")

    final, reason = _wait(
        stack_state,
        lambda s: not s.endswith("_IN_PROGRESS"),
        what=f"stack {stack_name}",
        timeout=timeout,
        poll=poll,
    )
    if final not in ("CREATE_COMPLETE", "UPDATE_COMPLETE"):
        raise DeployError(
            f"stack {stack_name} ended {final} ({reason or 'no reason given'}): "
            + _failure_reasons(cfn, stack_name)
        )
    log(f"{stack_name}: {final}")
    return DeployResult(
        stack_name, "created" if change_type == "CREATE" else "updated", stack_outputs(cfn, stack_name)
    )


def stack_outputs(cfn: Any, stack_name: str) -> dict[str, str]:
    """``{OutputKey: OutputValue}`` of the stack."""
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def deploy_stage(config: StageConfig, *, region: str | None = None, cfn: Any = None) -> DeployResult:
    """Synthesize ``config``'s stack and deploy it (``config`` must name the pushed image)."""
    import boto3

    from infra.app import synth_templates

    config.validate(require_image=True)
    template = synth_templates([config])[config.stack_name]
    cfn = cfn or boto3.client("cloudformation", region_name=region)
    return deploy_template(
        cfn, config.stack_name, template, tags={"project": config.ecr_repository, "stage": config.stage}
    )


def deploy_steps(config: StageConfig, *, region: str | None) -> list[str]:
    """Human-readable deploy steps (``--dry-run``), with the equivalent commands."""
    # Every knob that differs from params.yaml goes on the command line, so it reproduces `config`.
    base = dataclasses.asdict(load_stage(config.stage, require_image=False))
    context: list[str] = []
    for key, value in dataclasses.asdict(config).items():
        if value != base[key]:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            context += ["--context", f"{key}={text}"]
    synth = ["python", "-m", "infra.app", "--stage", config.stage, *context]
    return [
        f"synth {config.stack_name}: {shlex.join(synth)}",
        f"deploy {config.stack_name} to {region or '<AWS region from the environment>'}: CloudFormation "
        f"change set ({'/'.join(CAPABILITIES)}), execute, wait; knobs {describe(config)}",
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 deployed (or unchanged), 2 bad configuration, 1 AWS/CloudFormation failure."""
    parser = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True)
    parser.add_argument("--image-tag", help="tag pushed by release.publish (or --context image_digest=...)")
    parser.add_argument("--region", default=None)
    parser.add_argument("--context", "-c", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, touch nothing")
    args = parser.parse_args(argv)

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        context = parse_context(args.context)
        if args.image_tag:
            context["image_tag"] = args.image_tag
        config = load_stage(args.stage, context)
        if args.dry_run:
            for step in deploy_steps(config, region=args.region):
                print(step)
            return 0
        result = deploy_stage(config, region=args.region)
    except ConfigError as exc:
        print(f"deploy refused: {exc}", file=sys.stderr)
        return 2
    except (DeployError, BotoCoreError, ClientError) as exc:
        print(f"deploy failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"stack": result.stack_name, "action": result.action, **result.outputs}, indent=2))
    return 0


def with_image(config: StageConfig, *, tag: str, repository: str) -> StageConfig:
    """``config`` pointing at a freshly pushed image (release passes its tag and repository)."""
    return replace(config, image_tag=tag, image_digest=None, ecr_repository=repository).validate()


if __name__ == "__main__":
    raise SystemExit(main())
