"""Release the promoted model as a Lambda container image in ECR.

``python -m release.publish [--dry-run] [--repository NAME] [--region REGION]``

A release must ship exactly the model the registry calls champion: before anything is
built, ``serving/model/metadata.json`` is validated (schema, model sha256) and compared
field by field with the MLflow registry's alias (registered model, version, run id, and
the sha256 of the ONNX file stored in the registry). Any difference refuses the release.

The image tag is ``v<registry_version>-<git short sha>`` so an image names both the model
and the code that serves it. ECR is driven through boto3 (endpoint and credentials from
the standard AWS environment variables, so a local AWS endpoint works too); Docker is
driven through its CLI, and :func:`docker_commands` only *builds* the argv lists so that
they can be printed (``--dry-run``) and tested without a Docker engine.

After the push, the stage's CloudFormation stack (``infra/``, ``--stage``, default ``dev``) is
deployed with the pushed tag, so one command takes a promoted model to a running API
(``--no-deploy`` stops after the push). ``--dry-run`` prints every step (checks, docker commands,
synth and deploy) and needs no AWS credentials or region: without them it shows placeholders
instead of looking anything up.

Runs in the main (training) venv: it needs mlflow, PyYAML and aws-cdk-lib, which the image does not.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config.params import load_params
from config.paths import PARAMS_FILE, REPO_ROOT
from config.tracking_uri import tracking_uri as resolved_tracking_uri
from core.contract import ModelMetadata, ModelMetadataError, load_metadata
from core.files import sha256_file


class ReleaseError(RuntimeError):
    """The release is refused; the message says why and what to do."""


class PublishError(RuntimeError):
    """The checks passed but AWS or Docker failed while publishing."""


@dataclass(frozen=True)
class DockerCommand:
    """One docker CLI invocation; ``stdin`` carries secrets so they never appear in argv."""

    argv: list[str]
    stdin: str | None = None

    def display(self) -> str:
        """Shell-quoted command line, with the stdin secret redacted."""
        line = shlex.join(self.argv)
        return f"{line}  # password on stdin (redacted)" if self.stdin is not None else line


@dataclass(frozen=True)
class RegistryLogin:
    """Credentials for ``docker login`` decoded from ECR's authorization token."""

    registry: str
    username: str
    password: str


def load_promoted(model_dir: Path) -> ModelMetadata:
    """Validated metadata of the promoted model, or a refusal that says how to get one."""
    if not (model_dir / "metadata.json").is_file():
        raise ReleaseError(
            f"no promoted model in {model_dir} (metadata.json missing): run the pipeline's "
            "promote stage (dvc repro) or `dvc pull` first"
        )
    try:
        return load_metadata(model_dir, verify_sha256=True)
    except ModelMetadataError as exc:
        raise ReleaseError(f"promoted model metadata is invalid: {exc}") from exc


def _registry_onnx_sha256(uri: str, tracking_uri: str, model_file: str) -> str:
    """Download the registered artifact and hash its ONNX file (the bytes promote copied)."""
    import mlflow
    from mlflow.artifacts import download_artifacts

    # MLflow resolves ``models:/`` URIs through the process-wide registry URI, whatever is passed
    # to download_artifacts, so point the globals at this store for the call and restore them.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="release-registry-") as tmp:
        try:
            local = Path(
                download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
                )
            )
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
        candidates = [local] if local.is_file() else sorted(local.rglob("*.onnx"))
        named = [p for p in candidates if p.name == Path(model_file).name]
        chosen = named or candidates
        if len(chosen) != 1:
            raise ReleaseError(f"registry artifact {uri} holds {len(chosen)} ONNX files, expected one")
        return sha256_file(chosen[0])


def check_champion(meta: ModelMetadata, *, tracking_uri: str, model_name: str, alias: str) -> None:
    """Refuse unless the promoted model is exactly the registry's ``alias`` version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        raise ReleaseError(
            f"registry {tracking_uri} has no {model_name}@{alias}: {exc.message.splitlines()[0]}"
        ) from exc

    mismatches = []
    if meta.registered_model != model_name:
        mismatches.append(f"registered_model {meta.registered_model!r} != {model_name!r}")
    champion_version = str(version.version)  # MLflow returns an int, metadata holds a string
    if str(meta.registry_version) != champion_version:
        mismatches.append(
            f"registry_version {meta.registry_version!r} != {alias} version {champion_version!r}"
        )
    if meta.run_id != (version.run_id or ""):
        mismatches.append(f"run_id {meta.run_id!r} != {alias} run_id {version.run_id!r}")
    if not mismatches:
        registry_sha = _registry_onnx_sha256(
            f"models:/{model_name}/{champion_version}", tracking_uri, meta.model_file
        )
        if registry_sha != meta.model_sha256:
            mismatches.append(f"model_sha256 {meta.model_sha256} != registry ONNX sha256 {registry_sha}")
    if mismatches:
        raise ReleaseError(
            f"serving model does not match {model_name}@{alias} in {tracking_uri}: "
            + "; ".join(mismatches)
            + " (re-run the promote stage)"
        )


def git_commit(repo: Path = REPO_ROOT, *, short: bool) -> str:
    """HEAD of the repository the image is built from."""
    argv = ["git", "-C", str(repo), "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ReleaseError(f"cannot read the git commit of {repo}: {exc}") from exc


def image_tag(registry_version: str, git_short_sha: str) -> str:
    """``v<registry_version>-<git short sha>``: which model, served by which code."""
    return f"v{registry_version}-{git_short_sha}"


def ensure_repository(ecr: Any, name: str, *, create: bool = True) -> tuple[str, bool]:
    """Return ``(repositoryUri, created)``, creating the repository when it does not exist."""
    try:
        repos = ecr.describe_repositories(repositoryNames=[name])["repositories"]
        return repos[0]["repositoryUri"], False
    except ecr.exceptions.RepositoryNotFoundException:
        if not create:
            raise
    repo = ecr.create_repository(
        repositoryName=name,
        imageTagMutability="IMMUTABLE",  # a tag names one model + one commit, forever
        imageScanningConfiguration={"scanOnPush": True},
    )["repository"]
    return repo["repositoryUri"], True


def registry_login(ecr: Any) -> RegistryLogin:
    """Decode ECR's ``user:password`` token (the user is always ``AWS``)."""
    data = ecr.get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    return RegistryLogin(registry=data["proxyEndpoint"], username=user, password=password)


def docker_commands(
    *,
    login: RegistryLogin,
    repository_uri: str,
    tag: str,
    build_args: dict[str, str],
    context: Path,
    dockerfile: Path,
    local_name: str,
    docker: str = "docker",
    platform: str = "linux/amd64",
) -> list[DockerCommand]:
    """The login, build, tag and push invocations, in order (argv lists, nothing is run).

    ``platform`` must match the function's architecture (the stage's ``architecture`` knob).
    """
    local_image = f"{local_name}:{tag}"
    remote_image = f"{repository_uri}:{tag}"
    build = [docker, "build", "--file", str(dockerfile), "--platform", platform, "--tag", local_image]
    for key in sorted(build_args):
        build += ["--build-arg", f"{key}={build_args[key]}"]
    build.append(str(context))
    return [
        DockerCommand(
            [docker, "login", "--username", login.username, "--password-stdin", login.registry],
            stdin=login.password,
        ),
        DockerCommand(build),
        DockerCommand([docker, "tag", local_image, remote_image]),
        DockerCommand([docker, "push", remote_image]),
    ]


def run_commands(commands: list[DockerCommand]) -> None:
    """Run each command, stopping at the first failure (the password only goes to stdin)."""
    for cmd in commands:
        print(f"+ {cmd.display()}", file=sys.stderr, flush=True)
        try:
            subprocess.run(cmd.argv, input=cmd.stdin, text=True, check=True)
        except FileNotFoundError as exc:
            raise PublishError(f"{cmd.argv[0]!r} not found: a Docker client and engine are needed") from exc
        except subprocess.CalledProcessError as exc:
            raise PublishError(
                f"`{shlex.join(cmd.argv[:2])}` failed with exit code {exc.returncode}"
            ) from exc


@dataclass(frozen=True)
class ReleasePlan:
    """Everything a release decided, for printing and for tests."""

    image: str
    tag: str
    repository_created: bool
    commands: list[DockerCommand]
    region: str | None = None
    summary: str = ""


def write_edge_package(out: Path, model_dir: Path) -> list[Path]:
    """The edge agent's systemd unit, Greengrass v2 recipe (versioned by the champion's registry
    version) and example config: released with the image, so the line PCs follow the same model."""
    from edge.package import component_version, write_package

    version = load_metadata(model_dir, verify_sha256=False).registry_version
    return write_package(out, component_version(version))


def plan_release(
    *,
    model_dir: Path,
    repository: str,
    region: str | None,
    tracking_uri: str,
    model_name: str,
    alias: str,
    dry_run: bool,
    docker: str = "docker",
    context: Path = REPO_ROOT,
    platform: str = "linux/amd64",
) -> ReleasePlan:
    """Check the model against the registry, prepare ECR and return the docker commands.

    In ``dry_run`` mode nothing in AWS is changed (no repository is created, no login token is
    requested); without a region or credentials nothing is even looked up and the plan shows
    placeholders. A real run refuses early, before building, when either is missing.
    """
    import boto3

    meta = load_promoted(model_dir)
    check_champion(meta, tracking_uri=tracking_uri, model_name=model_name, alias=alias)
    tag = image_tag(meta.registry_version, git_commit(context, short=True))
    summary = (
        f"serving model = {model_name}@{alias}: version {meta.registry_version}, run {meta.run_id}, "
        f"sha256 {meta.model_sha256[:12]}"
    )

    session = boto3.session.Session(region_name=region)
    region = session.region_name
    has_credentials = session.get_credentials() is not None
    if not dry_run and region is None:
        raise ReleaseError("no AWS region: pass --region or set AWS_REGION (or a profile's region)")
    if not dry_run and not has_credentials:
        raise ReleaseError(
            "no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or run where an IAM role provides them)"
        )
    created = False
    if region is None or not has_credentials:  # dry run only (checked above)
        missing = " and ".join(
            n for n, gone in (("region", region is None), ("credentials", not has_credentials)) if gone
        )
        host = f"<account>.dkr.ecr.{region or '<region>'}.amazonaws.com"
        repo_uri = f"{host}/{repository}"
        login = RegistryLogin(registry=f"https://{host}", username="AWS", password="<not requested>")
        print(f"(dry run) no AWS {missing}: showing placeholders, nothing was looked up", file=sys.stderr)
    elif dry_run:  # read-only look-ups: where the image would go
        ecr = session.client("ecr")
        try:
            repo_uri, _ = ensure_repository(ecr, repository, create=False)
        except ecr.exceptions.RepositoryNotFoundException:
            account = session.client("sts").get_caller_identity()["Account"]
            repo_uri = f"{account}.dkr.ecr.{region}.amazonaws.com/{repository}"
            print(
                f"(dry run) ECR repository {repository!r} does not exist; a real run creates it",
                file=sys.stderr,
            )
        login = RegistryLogin(
            registry=f"https://{repo_uri.split('/')[0]}", username="AWS", password="<not requested>"
        )
    else:
        ecr = session.client("ecr")
        repo_uri, created = ensure_repository(ecr, repository, create=True)
        login = registry_login(ecr)

    build_args = {
        "MODEL_VERSION": meta.registry_version,
        "MODEL_NAME": meta.model_name,
        "MODEL_SHA256": meta.model_sha256,
        "GIT_COMMIT": git_commit(context, short=False),
    }
    commands = docker_commands(
        login=login,
        repository_uri=repo_uri,
        tag=tag,
        build_args=build_args,
        context=context,
        dockerfile=context / "Dockerfile",
        local_name=repository,
        docker=docker,
        platform=platform,
    )
    return ReleasePlan(
        image=f"{repo_uri}:{tag}",
        tag=tag,
        repository_created=created,
        commands=commands,
        region=region,
        summary=summary,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 released, 2 refused by a check (nothing pushed), 1 AWS/Docker failure."""
    # params.yaml is the single place for names such as the registered model name.
    params = load_params(PARAMS_FILE)
    parser = argparse.ArgumentParser(prog="python -m release.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="check and print every step only")
    parser.add_argument("--repository", default=params.need("registry").model_name)
    parser.add_argument("--region", default=None, help="AWS region (default: AWS_REGION / AWS config)")
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / params.need("serving").model_dir)
    parser.add_argument("--docker", default="docker", help="docker CLI executable")
    parser.add_argument("--stage", default="dev", help="stage to deploy (params.yaml deploy.stages)")
    parser.add_argument(
        "--context", "-c", action="append", default=[], metavar="KEY=VALUE", help="override a deploy knob"
    )
    parser.add_argument("--no-deploy", action="store_true", help="stop after pushing the image")
    parser.add_argument(
        "--edge-package",
        type=Path,
        default=REPO_ROOT / "build" / "release" / "edge",
        help="where the edge agent's systemd unit and Greengrass recipe for this model are written",
    )
    parser.add_argument("--yes", action="store_true", help="execute the change set without asking (CI)")
    parser.add_argument(
        "--allow-replace", action="store_true", help="allow replacing/removing the results table or bucket"
    )
    args = parser.parse_args(argv)

    from botocore.exceptions import BotoCoreError, ClientError

    from infra.config import ConfigError, load_stage, parse_context
    from infra.deploy import DeployError, DeployRefused, deploy_steps, require_reviewer, with_image

    tracking_uri = resolved_tracking_uri()  # the training side's rule (config.tracking_uri)
    try:
        # The stage's knobs are checked before anything is built: a bad one costs no build.
        context = {"ecr_repository": args.repository, **parse_context(args.context)}
        stage = load_stage(args.stage, context, require_image=False)
        plan = plan_release(
            model_dir=args.model_dir,
            repository=args.repository,
            region=args.region,
            tracking_uri=tracking_uri,
            model_name=params.need("registry").model_name,
            alias=params.need("registry").alias,
            dry_run=args.dry_run,
            docker=args.docker,
            platform=stage.docker_platform,
        )
        target = with_image(stage, tag=plan.tag, repository=args.repository)
        if not args.dry_run and not args.no_deploy:
            require_reviewer(args.yes)  # refused before a build that nobody could then deploy
        edge_files = write_edge_package(args.edge_package, args.model_dir)
        if args.dry_run:
            print(f"step 1 check: {plan.summary}")
            print(f"step 1b edge package: {', '.join(str(f) for f in edge_files)}")
            print(f"step 2 build and push {plan.image} ({stage.docker_platform}):")
            for cmd in plan.commands:
                print(f"  {cmd.display()}")
            if not args.no_deploy:
                print(f"step 3 deploy stage {stage.stage}:")
                for line in deploy_steps(target, region=plan.region):
                    print(f"  {line}")
            return 0
        if plan.repository_created:
            print(f"created ECR repository {args.repository}", file=sys.stderr)
        run_commands(plan.commands)
        print(plan.image)
        if not args.no_deploy:
            try:
                result = deploy_stage(
                    target, region=plan.region, yes=args.yes, allow_replace=args.allow_replace
                )
            except (DeployError, BotoCoreError, ClientError) as exc:
                retry = shlex.join(
                    ["python", "-m", "infra.deploy", "--stage", stage.stage, "--image-tag", plan.tag]
                    + [word for pair in args.context for word in ("--context", pair)]
                    + ["--yes"] * args.yes
                    + ["--allow-replace"] * args.allow_replace
                )
                raise PublishError(
                    f"{plan.image} is pushed, but deploying stage {stage.stage} failed: {exc} "
                    f"(fix the cause, then: {retry})"
                ) from exc
            print(
                json.dumps({"stack": result.stack_name, "action": result.action, **result.outputs}, indent=2)
            )
    except (ReleaseError, ConfigError, DeployRefused) as exc:
        print(f"release refused: {exc}", file=sys.stderr)
        return 2
    except (PublishError, DeployError, BotoCoreError, ClientError) as exc:
        print(f"release failed: {exc}", file=sys.stderr)
        return 1
    return 0


def deploy_stage(config: Any, *, region: str | None, yes: bool = False, allow_replace: bool = False) -> Any:
    """Deploy ``config``'s stack (``infra.deploy.deploy_stage``; imported late: it needs aws-cdk-lib).

    The change set is shown and confirmed on the terminal unless ``yes``.
    """
    from infra.deploy import deploy_stage as deploy

    return deploy(config, region=region, yes=yes, allow_replace=allow_replace)


if __name__ == "__main__":
    raise SystemExit(main())
