"""Provision camera identities: ``python -m infra.cameras add CAMERA_ID --stage dev`` (``vi-camera``).

A camera is an IAM user at :data:`serving.identity.CAMERA_PATH` whose user name is its camera id
(the convention the handler and the stack's ``CameraWriterPolicy`` both rely on): ``add`` creates
that user, attaches the stage's writer policy (which allows ``POST cameras/${aws:username}/images``
and nothing else), creates an access key and writes it to a credentials file readable by the owner
only (mode 0600). ``remove`` deletes the camera's keys, policies and user. Nothing else in the
account is touched: ``remove`` refuses a user that is not under the camera path.

Why IAM users with long-lived keys: a camera or line PC has no other AWS identity to assume a role
from. Where one exists (IoT credentials provider, IAM Roles Anywhere), bind the role session name
to the camera id instead; the policy variable then has to change with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from serving.events import IDENTIFIER_RE
from serving.identity import CAMERA_PATH, caller_from_event, camera_arn

# Logical id of the writer policy in every stage's stack (the stack fixes it; ``add`` looks it up).
CAMERA_WRITER_POLICY_ID = "CameraWriterPolicy"
DEFAULT_CREDENTIALS_DIR = Path.home() / ".visual-inspection" / "cameras"
_EXAMPLE_ACCOUNT = "123456789012"


class CameraError(RuntimeError):
    """Provisioning was refused or failed; the one-line message says why and what to do."""


def camera_id_problem(camera_id: str) -> str | None:
    """Why ``camera_id`` cannot be a camera, or ``None`` when it can.

    It must be an id the API accepts in the path (serving.events' identifier rule) *and* an IAM
    user name the handler recognises as that camera (serving.identity's ARN rule, which is within
    IAM's user-name characters and length). Both rules are asked, not restated.
    """
    arn = camera_arn(_EXAMPLE_ACCOUNT, camera_id)
    as_caller = caller_from_event({"requestContext": {"identity": {"userArn": arn}}})
    if IDENTIFIER_RE.match(camera_id) and as_caller.camera_id == camera_id:
        return None
    return (
        f"camera id {camera_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
        "or digit (an IAM user name that the API also accepts as camera_id)"
    )


def validate_camera_id(camera_id: str) -> str:
    """``camera_id`` unchanged, or :class:`CameraError` with the rule."""
    problem = camera_id_problem(camera_id)
    if problem:
        raise CameraError(problem)
    return camera_id


def writer_policy_arn(cfn: Any, stack_name: str) -> str:
    """The deployed stage's ``CameraWriterPolicy`` ARN (its physical id in the stack)."""
    from botocore.exceptions import ClientError

    try:
        detail = cfn.describe_stack_resource(StackName=stack_name, LogicalResourceId=CAMERA_WRITER_POLICY_ID)
    except ClientError as exc:
        raise CameraError(
            f"stack {stack_name} has no {CAMERA_WRITER_POLICY_ID} ({exc.response['Error']['Message']}): "
            "deploy the stage first (make deploy STAGE=...) or pass --policy-arn"
        ) from exc
    return str(detail["StackResourceDetail"]["PhysicalResourceId"])


def write_credentials(path: Path, access_key_id: str, secret_access_key: str) -> None:
    """An AWS shared-credentials file (``[default]``) created 0600; an existing file is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise CameraError(f"{path} exists: move it away or pass --credentials-dir") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(
            f"[default]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {secret_access_key}\n"
        )
    os.chmod(path, 0o600)  # in case the umask or an existing ACL widened it


@dataclass(frozen=True)
class Provisioned:
    """What ``add`` created, for printing and tests (the secret is only in the file)."""

    camera_id: str
    user_arn: str
    policy_arn: str
    access_key_id: str
    credentials_file: Path
    policy_document: dict[str, Any]


def _policy_document(iam: Any, policy_arn: str) -> dict[str, Any]:
    version = iam.get_policy(PolicyArn=policy_arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=policy_arn, VersionId=version)["PolicyVersion"]["Document"]
    return json.loads(unquote(document)) if isinstance(document, str) else dict(document)


def add_camera(
    iam: Any,
    camera_id: str,
    *,
    policy_arn: str,
    credentials_file: Path,
    tags: dict[str, str] | None = None,
) -> Provisioned:
    """Create the camera user, attach ``policy_arn``, create a key and write ``credentials_file``.

    All or nothing: if a later step fails, what the earlier ones created is removed again.
    """
    validate_camera_id(camera_id)
    if credentials_file.exists():
        raise CameraError(f"{credentials_file} exists: move it away or pass --credentials-dir")
    policy_document = _policy_document(iam, policy_arn)
    try:
        user = iam.create_user(
            Path=CAMERA_PATH,
            UserName=camera_id,
            Tags=[{"Key": k, "Value": v} for k, v in sorted((tags or {}).items())],
        )["User"]
    except iam.exceptions.EntityAlreadyExistsException as exc:
        raise CameraError(
            f"camera {camera_id!r} already exists (IAM user {camera_id}): remove it first "
            f"(python -m infra.cameras remove {camera_id}) or choose another id"
        ) from exc
    try:
        iam.attach_user_policy(UserName=camera_id, PolicyArn=policy_arn)
        key = iam.create_access_key(UserName=camera_id)["AccessKey"]
        write_credentials(credentials_file, key["AccessKeyId"], key["SecretAccessKey"])
    except BaseException:
        _delete_user(iam, camera_id)
        raise
    return Provisioned(
        camera_id, user["Arn"], policy_arn, key["AccessKeyId"], credentials_file, policy_document
    )


def _delete_user(iam: Any, user_name: str) -> None:
    for key in iam.list_access_keys(UserName=user_name)["AccessKeyMetadata"]:
        iam.delete_access_key(UserName=user_name, AccessKeyId=key["AccessKeyId"])
    for policy in iam.list_attached_user_policies(UserName=user_name)["AttachedPolicies"]:
        iam.detach_user_policy(UserName=user_name, PolicyArn=policy["PolicyArn"])
    for name in iam.list_user_policies(UserName=user_name)["PolicyNames"]:
        iam.delete_user_policy(UserName=user_name, PolicyName=name)
    iam.delete_user(UserName=user_name)


def remove_camera(iam: Any, camera_id: str) -> str:
    """Delete the camera's keys, policies and user; refuse any user not under the camera path."""
    validate_camera_id(camera_id)
    try:
        user = iam.get_user(UserName=camera_id)["User"]
    except iam.exceptions.NoSuchEntityException as exc:
        raise CameraError(f"no camera {camera_id!r} (no IAM user of that name)") from exc
    if user.get("Path") != CAMERA_PATH:
        raise CameraError(
            f"IAM user {camera_id} is at path {user.get('Path')!r}, not {CAMERA_PATH}: "
            "not a camera, not removed"
        )
    _delete_user(iam, camera_id)
    return str(user["Arn"])


def main(argv: list[str] | None = None) -> int:
    """CLI: 0 done, 2 refused (bad id, exists, no stack), 1 AWS failure."""
    parser = argparse.ArgumentParser(prog="python -m infra.cameras", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a camera user with its key and the writer policy")
    add.add_argument("camera_id")
    add.add_argument("--stage", default="dev", help="stage whose writer policy to attach (default dev)")
    add.add_argument("--region", default=None, help="AWS region of the stage's stack")
    add.add_argument("--policy-arn", default=None, help="writer policy (default: the stage stack's)")
    add.add_argument("--credentials-dir", type=Path, default=DEFAULT_CREDENTIALS_DIR)
    remove = commands.add_parser("remove", help="delete a camera user, its keys and policies")
    remove.add_argument("camera_id")
    args = parser.parse_args(argv)

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from infra.config import ConfigError, load_stage

    try:
        validate_camera_id(args.camera_id)  # before any AWS call
        iam = boto3.client("iam")
        if args.command == "remove":
            print(f"removed camera {args.camera_id} ({remove_camera(iam, args.camera_id)})")
            return 0
        stage = load_stage(args.stage, require_image=False)
        policy_arn = args.policy_arn or writer_policy_arn(
            boto3.client("cloudformation", region_name=args.region), stage.stack_name
        )
        done = add_camera(
            iam,
            args.camera_id,
            policy_arn=policy_arn,
            credentials_file=args.credentials_dir / stage.stage / f"{args.camera_id}.credentials",
            tags={"project": stage.ecr_repository, "stage": stage.stage},
        )
    except (CameraError, ConfigError) as exc:
        print(f"camera: {exc}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as exc:
        print(f"camera: AWS call failed: {exc}", file=sys.stderr)
        return 1
    print(f"camera {done.camera_id}: IAM user {done.user_arn}, access key {done.access_key_id}")
    print(f"credentials: {done.credentials_file} (mode 0600; copy it to the camera, then delete it here)")
    print(f"policy {done.policy_arn}:")
    print(json.dumps(done.policy_document, indent=2))
    print(
        f"upload: AWS_SHARED_CREDENTIALS_FILE={done.credentials_file} "
        f"vi-client IMAGE --camera {done.camera_id} --url <the stack's ApiUrl output>"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
