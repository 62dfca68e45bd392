"""Deploy one stage: synthesize its stack for an image tag, then a reviewed CloudFormation change set.

``python -m infra.deploy --stage dev --image-tag v3-abc1234 [--region R] [--context K=V]
[--yes] [--allow-replace] [--preview] [--dry-run]``
(normally run by ``python -m release.publish`` / ``make deploy``, which push the image first).

Every deploy shows its change set before executing it: resources added, modified (and whether
CloudFormation will *replace* them), removed, and the IAM statements that appear or disappear
(from the deployed template against the new one). Then it asks on the terminal; ``--yes`` executes
unasked (CI), and without a terminal and without ``--yes`` it refuses, so nobody executes a change
nobody saw. A change set that replaces or removes the results table or bucket (a key-schema
change, a renamed construct) is refused unless ``--allow-replace`` is given: the new resource would
be empty. ``--preview`` shows the change set and deletes it. Termination protection
(``termination_protection``, on in prod) is applied after the change set, because CloudFormation
does not take it in a change set.

Why plain CloudFormation as the release path: the stack has no assets (the image is already in
ECR) and uses the bootstrapless synthesizer, so no CDK CLI, no ``cdk bootstrap`` and no staging
bucket are needed; boto3 is. Change sets make a deploy that changes nothing a no-op, and a failed
update is rolled back by CloudFormation, so a fault never leaves a half-updated stage. The same app
also runs under the CDK CLI (``cdk.json``: ``cdk diff -c stage=prod -c image_tag=...``) for its
IAM-change table and ``cdk deploy``'s approval prompt.
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


class DeployRefused(DeployError):
    """Nothing was executed because a person's decision is missing (review, --allow-replace)."""


# Resources whose replacement or removal loses what the stage stored (the new one starts empty).
GUARDED_TYPES = {"AWS::DynamoDB::Table": "results table", "AWS::S3::Bucket": "results bucket"}
_ACTION_MARK = {"Add": "+", "Modify": "~", "Remove": "-", "Import": "<", "Dynamic": "?"}
_POLICY_DOCUMENT_TYPES = (
    "AWS::IAM::Policy",
    "AWS::IAM::ManagedPolicy",
    "AWS::S3::BucketPolicy",
    "AWS::SNS::TopicPolicy",
    "AWS::SQS::QueuePolicy",
)


@dataclass(frozen=True)
class ResourceChange:
    """One resource line of a change set (``describe_change_set`` → ``Changes[].ResourceChange``)."""

    action: str
    logical_id: str
    resource_type: str
    replacement: str = ""  # True | False | Conditional (Modify only)
    details: tuple[str, ...] = ()  # changed attributes; "!" marks one that forces recreation

    @classmethod
    def from_api(cls, change: dict[str, Any]) -> ResourceChange:
        rc = change.get("ResourceChange", {})
        details = []
        for detail in rc.get("Details", []):
            target = detail.get("Target", {})
            name = target.get("Name") or target.get("Attribute", "")
            recreate = target.get("RequiresRecreation") in ("Always", "Conditionally")
            details.append(f"{name}!" if recreate else name)
        return cls(
            action=rc.get("Action", "?"),
            logical_id=rc.get("LogicalResourceId", "?"),
            resource_type=rc.get("ResourceType", "?"),
            replacement=rc.get("Replacement", "") or "",
            details=tuple(dict.fromkeys(d for d in details if d)),
        )

    @property
    def replaces(self) -> bool:
        """CloudFormation will (or may: ``Conditional``) create a new physical resource."""
        return self.action == "Modify" and self.replacement in ("True", "Conditional")

    @property
    def loses_data(self) -> bool:
        """A table or bucket replaced or removed: readers of the stack's outputs see an empty one."""
        return self.resource_type in GUARDED_TYPES and (self.replaces or self.action == "Remove")

    def line(self) -> str:
        replace_note = {"True": "  REPLACE", "Conditional": "  MAY REPLACE"}.get(self.replacement, "")
        detail = f" ({', '.join(self.details)})" if self.details else ""
        mark = _ACTION_MARK.get(self.action, "?")
        return f"  {mark} {self.action:<7} {self.logical_id}  {self.resource_type}{replace_note}{detail}"


@dataclass(frozen=True)
class ChangeSetReview:
    """What a change set would do, rendered for the person who decides."""

    stack_name: str
    change_type: str  # CREATE | UPDATE
    changes: tuple[ResourceChange, ...]
    iam_changes: tuple[str, ...]

    @property
    def data_losing(self) -> list[ResourceChange]:
        return [c for c in self.changes if c.loses_data]

    def render(self) -> str:
        count = {a: sum(c.action == a for c in self.changes) for a in ("Add", "Modify", "Remove")}
        replaced = sum(c.replaces for c in self.changes)
        lines = [
            f"{self.stack_name}: {self.change_type.lower()} change set: {count['Add']} to add, "
            f"{count['Modify']} to modify ({replaced} replaced), {count['Remove']} to remove"
        ]
        order = {a: i for i, a in enumerate(_ACTION_MARK)}
        ordered = sorted(self.changes, key=lambda c: (order.get(c.action, 9), c.logical_id))
        lines += [c.line() for c in ordered]
        lines.append(f"IAM statement changes: {len(self.iam_changes) or 'none'}")
        lines += [f"  {line}" for line in self.iam_changes]
        for change in self.data_losing:
            verb = "removes" if change.action == "Remove" else "replaces"
            lines.append(
                f"  !! {verb} the {GUARDED_TYPES[change.resource_type]} {change.logical_id}: the stack's "
                "new one starts empty (needs --allow-replace)"
            )
        return "\n".join(lines)


def show(node: Any) -> str:
    """A template value as text: ``Ref``/``GetAtt`` become ``${Id}``/``${Id.Attr}``, joins are joined."""
    if isinstance(node, str):
        return node
    if isinstance(node, list):
        return ", ".join(show(item) for item in node)
    if isinstance(node, dict) and len(node) == 1:
        ((key, value),) = node.items()
        if key == "Ref":
            return f"${{{value}}}"
        if key == "Fn::GetAtt":
            return f"${{{value if isinstance(value, str) else '.'.join(value)}}}"
        if key == "Fn::Join":
            return str(value[0]).join(show(part) for part in value[1])
        if key == "Fn::Sub":
            return value if isinstance(value, str) else str(value[0])
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _statement_text(statement: dict[str, Any]) -> str:
    def listed(key: str) -> str:
        value = statement.get(key)
        return show(value if isinstance(value, list) else [value]) if value is not None else ""

    text = f"{statement.get('Effect', 'Allow')} {listed('Action') or 'NotAction ' + listed('NotAction')}"
    if "Principal" in statement:
        text += f" to {show(statement['Principal'])}"
    text += f" on {listed('Resource') or listed('NotResource') or '(the resource)'}"
    for operator, pairs in sorted((statement.get("Condition") or {}).items()):
        for key, value in sorted(pairs.items()):
            text += f" when {operator} {key}={show(value)}"
    return text


def iam_statements(template: dict[str, Any] | None) -> set[str]:
    """Every permission-bearing statement of a template, as ``[LogicalId] statement`` lines."""
    found: set[str] = set()
    for rid, resource in ((template or {}).get("Resources") or {}).items():
        kind, props = resource.get("Type", ""), resource.get("Properties") or {}
        documents = []
        if kind in _POLICY_DOCUMENT_TYPES:
            documents.append(props.get("PolicyDocument"))
        if kind == "AWS::IAM::Role":
            documents.append(props.get("AssumeRolePolicyDocument"))
            documents += [p.get("PolicyDocument") for p in props.get("Policies", [])]
            arns = props.get("ManagedPolicyArns", [])
            found |= {f"[{rid}] attach managed policy {show(arn)}" for arn in arns}
        if kind == "AWS::Lambda::Permission":
            found.add(
                f"[{rid}] Allow {show(props.get('Action'))} to {show(props.get('Principal'))} on "
                f"{show(props.get('FunctionName'))} when SourceArn={show(props.get('SourceArn', '*'))}"
            )
        for document in documents:
            for statement in (document or {}).get("Statement", []):
                found.add(f"[{rid}] {_statement_text(statement)}")
    return found


def iam_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, ...]:
    """``+``/``-`` lines for statements the new template adds or drops (what ``cdk diff`` calls
    IAM changes): the part of a change set a reviewer must read, whatever else changed."""
    before, after = iam_statements(old), iam_statements(new)
    return tuple([f"+ {s}" for s in sorted(after - before)] + [f"- {s}" for s in sorted(before - after)])


def describe_changes(cfn: Any, change_set_id: str, stack_name: str) -> tuple[ResourceChange, ...]:
    """All resource changes of a change set (every page)."""
    changes: list[ResourceChange] = []
    token: str | None = None
    while True:
        page = cfn.describe_change_set(
            ChangeSetName=change_set_id, StackName=stack_name, **({"NextToken": token} if token else {})
        )
        changes += [
            ResourceChange.from_api(c)
            for c in page.get("Changes", [])
            if c.get("Type", "Resource") == "Resource"
        ]
        token = page.get("NextToken")
        if not token:
            return tuple(changes)


def deployed_template(cfn: Any, stack_name: str) -> dict[str, Any] | None:
    """The stack's current template (``None`` before its first create)."""
    import yaml

    body = cfn.get_template(StackName=stack_name, TemplateStage="Original")["TemplateBody"]
    return body if isinstance(body, dict) else yaml.safe_load(body)


def refuse_data_loss(review: ChangeSetReview) -> None:
    """The refusal for a change set that replaces or removes the table or bucket."""
    losing = review.data_losing
    if losing:
        names = ", ".join(f"{GUARDED_TYPES[c.resource_type]} {c.logical_id}" for c in losing)
        raise DeployRefused(
            f"{review.stack_name}: the change set replaces or removes the {names}, whose data the new "
            "stack would not see; back it up, then deploy with --allow-replace (nothing was executed)"
        )


def ask_on_terminal(review: ChangeSetReview, *, stdin: Any = None, prompt: Any = None) -> bool:
    """Ask whether to execute; no terminal means nobody can answer, which is a refusal, not a yes."""
    stdin = stdin or sys.stdin
    prompt = prompt or sys.stderr
    if not stdin.isatty():
        raise DeployRefused(NOT_REVIEWED.format(stack=review.stack_name))
    prompt.write(f"Execute this change set on {review.stack_name}? [y/N] ")
    prompt.flush()
    return stdin.readline().strip().lower() in ("y", "yes")


NOT_REVIEWED = (
    "{stack}: not executed: stdin is not a terminal, so nobody can confirm the change set; "
    "rerun with --yes to execute unreviewed (CI) or --preview to only show it"
)


def require_reviewer(yes: bool, stdin: Any = None) -> None:
    """Refuse up front (before a build) when the deploy would later have nobody to confirm it."""
    if not yes and not (stdin or sys.stdin).isatty():
        raise DeployRefused(NOT_REVIEWED.format(stack="deploy"))


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
    confirm: Callable[[ChangeSetReview], bool] | None = None,
    allow_replace: bool = False,
    preview: bool = False,
    termination_protection: bool | None = None,
) -> DeployResult:
    """Create or update ``stack_name`` to ``template`` through a change set and wait for it.

    The change set is described and logged first. It is executed only if it loses no table or
    bucket data (or ``allow_replace``), ``preview`` is off, and ``confirm`` (when given) says yes;
    otherwise it is deleted and the result says ``previewed``/``cancelled``. ``termination_protection``
    (when not ``None``) is set on the stack afterwards, also when nothing else changed.
    """
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
            if not preview:
                _protect(cfn, stack_name, termination_protection, log)
            return DeployResult(stack_name, "unchanged", stack_outputs(cfn, stack_name))
        raise DeployError(f"change set for {stack_name} failed: {reason}")

    try:
        review = ChangeSetReview(
            stack_name,
            change_type,
            describe_changes(cfn, change_set_id, stack_name),
            iam_changes(deployed_template(cfn, stack_name) if change_type == "UPDATE" else None, template),
        )
        log(review.render())
        if not allow_replace:
            refuse_data_loss(review)
        proceed = not preview and (confirm is None or confirm(review))
    except BaseException:
        cfn.delete_change_set(ChangeSetName=change_set_id, StackName=stack_name)
        raise
    if not proceed:
        cfn.delete_change_set(ChangeSetName=change_set_id, StackName=stack_name)
        action = "previewed" if preview else "cancelled"
        log(f"{stack_name}: change set {action}, not executed")
        return DeployResult(stack_name, action, {})

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
    _protect(cfn, stack_name, termination_protection, log)
    return DeployResult(
        stack_name, "created" if change_type == "CREATE" else "updated", stack_outputs(cfn, stack_name)
    )


def _protect(cfn: Any, stack_name: str, enabled: bool | None, log: Callable[[str], None]) -> None:
    """Set the stack's termination protection to ``enabled`` when it differs (``None``: leave it)."""
    if enabled is None:
        return
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    if bool(stack.get("EnableTerminationProtection")) != enabled:
        cfn.update_termination_protection(StackName=stack_name, EnableTerminationProtection=enabled)
        log(f"{stack_name}: termination protection {'on' if enabled else 'off'}")


def stack_outputs(cfn: Any, stack_name: str) -> dict[str, str]:
    """``{OutputKey: OutputValue}`` of the stack."""
    stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def deploy_stage(
    config: StageConfig,
    *,
    region: str | None = None,
    cfn: Any = None,
    yes: bool = False,
    allow_replace: bool = False,
    preview: bool = False,
) -> DeployResult:
    """Synthesize ``config``'s stack and deploy it (``config`` must name the pushed image).

    Without ``yes`` the change set is confirmed on the terminal (:func:`ask_on_terminal`).
    """
    import boto3

    from infra.app import synth_templates

    config.validate(require_image=True)
    template = synth_templates([config])[config.stack_name]
    cfn = cfn or boto3.client("cloudformation", region_name=region)
    return deploy_template(
        cfn,
        config.stack_name,
        template,
        tags={"project": config.ecr_repository, "stage": config.stage},
        confirm=None if yes else ask_on_terminal,
        allow_replace=allow_replace,
        preview=preview,
        termination_protection=config.termination_protection,
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
        f"change set ({'/'.join(CAPABILITIES)}), show it, confirm, execute, wait; knobs {describe(config)}",
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 deployed (or unchanged), 2 bad configuration, 1 AWS/CloudFormation failure."""
    parser = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True)
    parser.add_argument("--image-tag", help="tag pushed by release.publish (or --context image_digest=...)")
    parser.add_argument("--region", default=None)
    parser.add_argument("--context", "-c", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="print the steps, touch nothing")
    parser.add_argument("--yes", action="store_true", help="execute the change set without asking (CI)")
    parser.add_argument(
        "--allow-replace", action="store_true", help="allow replacing/removing the results table or bucket"
    )
    parser.add_argument("--preview", action="store_true", help="show the change set, then delete it")
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
        if not args.preview:
            require_reviewer(args.yes)
        result = deploy_stage(
            config, region=args.region, yes=args.yes, allow_replace=args.allow_replace, preview=args.preview
        )
    except (ConfigError, DeployRefused) as exc:
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
