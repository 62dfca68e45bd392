"""``release.publish`` against a real local AWS endpoint and a real MLflow sqlite registry.

ECR calls go over HTTP to moto's server. There is no Docker engine in the test
environment, so ``docker`` is a fake executable on PATH that records its argv (and the
password it gets on stdin); the real engine is exercised only by an actual release.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from config.paths import REPO_ROOT as REPO
from release import publish as release

MODEL_NAME = "visual-inspection"  # params.yaml registry.model_name


@dataclass
class Registry:
    """A tmp MLflow registry with two versions: v1 = the fixture ONNX, v2 = other bytes."""

    tracking_uri: str
    run_ids: dict[str, str]

    def point_champion_at(self, version: str) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        client.set_registered_model_alias(MODEL_NAME, "champion", version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, serving_model_dir: Path) -> Registry:
    """Register two real model versions in a fresh sqlite MLflow store."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("release-test", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(MODEL_NAME)

    other = root / "other" / "model.onnx"
    other.parent.mkdir()
    other.write_bytes(b"not the promoted model")
    run_ids = {}
    for version, onnx in (("1", serving_model_dir / "model.onnx"), ("2", other)):
        run = client.create_run(exp)
        client.log_artifact(run.info.run_id, str(onnx), "model")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(
            MODEL_NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
        )
        assert str(mv.version) == version
        run_ids[version] = run.info.run_id
    return Registry(tracking_uri=uri, run_ids=run_ids)


def _write_meta(model_dir: Path, **fields: object) -> None:
    meta_path = model_dir / "metadata.json"
    data = json.loads(meta_path.read_text())
    data.update(fields)
    meta_path.write_text(json.dumps(data))


@pytest.fixture
def promoted(tmp_path: Path, serving_model_dir: Path, registry: Registry) -> Path:
    """A copy of the fixture model whose metadata claims to be registry version 1."""
    model_dir = tmp_path / "model"
    shutil.copytree(serving_model_dir, model_dir)
    _write_meta(model_dir, registered_model=MODEL_NAME, registry_version="1", run_id=registry.run_ids["1"])
    return model_dir


@pytest.fixture
def fake_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a recording ``docker`` first on PATH; returns the JSON-lines log it appends to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "docker.log"
    script = bin_dir / "docker"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "stdin = sys.stdin.read() if sys.argv[1:2] == ['login'] else None\n"
        "with open(os.environ['FAKE_DOCKER_LOG'], 'a') as fh:\n"
        "    fh.write(json.dumps({'argv': sys.argv[1:], 'stdin': stdin}) + '\\n')\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_LOG", str(log))
    return log


@pytest.fixture
def env(aws_env: str, registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """Local AWS endpoint + tmp registry, champion on version 1."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    registry.point_champion_at("1")
    return registry


def _git_short() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_release_creates_repo_logs_in_builds_tags_and_pushes(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert release.main(["--model-dir", str(promoted), "--region", "us-east-1", "--no-deploy"]) == 0

    ecr = boto3.client("ecr", region_name="us-east-1")
    repos = ecr.describe_repositories()["repositories"]
    assert [r["repositoryName"] for r in repos] == [MODEL_NAME]
    repo_uri = repos[0]["repositoryUri"]
    tag = f"v1-{_git_short()}"
    assert capsys.readouterr().out.strip() == f"{repo_uri}:{tag}"

    calls = [json.loads(line) for line in fake_docker.read_text().splitlines()]
    assert [c["argv"][0] for c in calls] == ["login", "build", "tag", "push"]
    login, build, tag_call, push = calls
    token = ecr.get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(token["authorizationToken"]).decode().partition(":")
    assert user == "AWS"
    assert login["argv"] == ["login", "--username", "AWS", "--password-stdin", token["proxyEndpoint"]]
    assert login["stdin"] == password and password not in json.dumps([build, tag_call, push])

    meta = json.loads((promoted / "metadata.json").read_text())
    full_sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    args = build["argv"]
    assert args[-1] == str(REPO)
    assert args[args.index("--file") + 1] == str(REPO / "Dockerfile")
    assert args[args.index("--tag") + 1] == f"{MODEL_NAME}:{tag}"
    build_args = {args[i + 1] for i, a in enumerate(args) if a == "--build-arg"}
    assert build_args == {
        "MODEL_VERSION=1",
        f"MODEL_NAME={meta['model_name']}",
        f"MODEL_SHA256={meta['model_sha256']}",
        f"GIT_COMMIT={full_sha}",
    }
    assert tag_call["argv"] == ["tag", f"{MODEL_NAME}:{tag}", f"{repo_uri}:{tag}"]
    assert push["argv"] == ["push", f"{repo_uri}:{tag}"]

    # A second release reuses the repository instead of failing or creating another.
    plan = release.plan_release(
        model_dir=promoted,
        repository=MODEL_NAME,
        region="us-east-1",
        tracking_uri=env.tracking_uri,
        model_name=MODEL_NAME,
        alias="champion",
        dry_run=False,
    )
    assert not plan.repository_created
    assert plan.image == f"{repo_uri}:{tag}"
    assert len(ecr.describe_repositories()["repositories"]) == 1


def test_dry_run_prints_commands_and_changes_nothing(
    env: Registry, promoted: Path, fake_docker: Path, tmp_path: Path
) -> None:
    edge_out = tmp_path / "edge-package"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "release.publish",
            "--dry-run",
            "--model-dir",
            str(promoted),
            "--edge-package",
            str(edge_out),
        ],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    docker_lines = [line.split() for line in lines if line.startswith("  docker ")]
    assert [words[1] for words in docker_lines] == ["login", "build", "tag", "push"]
    assert "redacted" in " ".join(docker_lines[0])
    repo_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/visual-inspection"  # moto's account
    assert docker_lines[-1][-1] == f"{repo_uri}:v1-{_git_short()}"
    assert any(line.startswith("step 3 deploy stage dev") for line in lines)
    # The edge agent's unit and recipe are released with the image, versioned by the champion.
    recipe = json.loads((edge_out / "com.visualinspection.EdgeAgent-1.0.0.json").read_text())
    assert recipe["ComponentVersion"] == "1.0.0"  # registry version 1
    assert "--no-deps" not in json.dumps(recipe)  # the pinned closure installs whole
    assert (edge_out / "vi-edge.service").read_text().count("python -m edge run") == 1
    assert not fake_docker.exists()  # docker never ran
    assert boto3.client("ecr", region_name="us-east-1").describe_repositories()["repositories"] == []


def _refusal(model_dir: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert release.main(["--model-dir", str(model_dir), "--region", "us-east-1", *extra]) == 2
    return capsys.readouterr().err


def _empty_aws_env(tracking_uri: str, tmp_path: Path) -> dict[str, str]:
    """The process environment with every AWS variable removed and no config/credential files.

    Instance-metadata look-ups are switched off so a missing credential is never searched for on
    the network.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    return env


def test_dry_run_needs_no_aws_credentials_or_region(
    registry: Registry, promoted: Path, fake_docker: Path, tmp_path: Path
) -> None:
    registry.point_champion_at("1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "release.publish",
            "--dry-run",
            "--model-dir",
            str(promoted),
            "--stage",
            "prod",
        ],
        cwd=REPO,
        env=_empty_aws_env(registry.tracking_uri, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no AWS region and credentials" in proc.stderr
    out = proc.stdout
    tag = f"v1-{_git_short()}"
    assert out.startswith("step 1 check: serving model = visual-inspection@champion: version 1")
    image = f"<account>.dkr.ecr.<region>.amazonaws.com/visual-inspection:{tag}"
    assert f"step 2 build and push {image} (linux/amd64)" in out
    assert f"docker push {shlex.quote(image)}" in out
    assert "step 3 deploy stage prod:" in out
    assert f"python -m infra.app --stage prod --context image_tag={tag}" in out
    assert "deploy visual-inspection-prod to <AWS region from the environment>" in out
    assert not fake_docker.exists()


def test_real_release_without_region_is_refused_before_building(
    registry: Registry,
    promoted: Path,
    fake_docker: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry.point_champion_at("1")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in _empty_aws_env(registry.tracking_uri, tmp_path).items():
        monkeypatch.setenv(key, value)
    assert release.main(["--model-dir", str(promoted)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "release refused: no AWS region: pass --region or set AWS_REGION (or a profile's region)"
    )
    assert not fake_docker.exists()


def test_release_deploys_the_stage_with_the_pushed_tag(
    env: Registry,
    promoted: Path,
    fake_docker: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """build → push → deploy: the deploy step receives exactly the image that was pushed.

    The deploy itself (synth + CloudFormation change set) is exercised against moto's
    CloudFormation in tests/infra/test_deploy_moto.py; here it is recorded, because moto cannot
    create the whole stack (see tests/infra/cfn_subset.py).
    """
    from infra.deploy import DeployResult

    deployed = []

    def record(config: Any, *, region: str | None, yes: bool, allow_replace: bool) -> DeployResult:
        assert (yes, allow_replace) == (True, False)  # --yes passed through; no replace allowed
        deployed.append((config, region, fake_docker.read_text().count("\n")))
        return DeployResult(config.stack_name, "created", {"ApiUrl": "https://example/prod/"})

    monkeypatch.setattr(release, "deploy_stage", record)
    argv = [
        "--model-dir",
        str(promoted),
        "--region",
        "us-east-1",
        "--stage",
        "prod",
        "-c",
        "architecture=arm64",
        "--yes",
    ]
    assert release.main(argv) == 0
    ((config, region, docker_calls_before_deploy),) = deployed
    assert docker_calls_before_deploy == 4  # login, build, tag, push all ran first
    tag = f"v1-{_git_short()}"
    assert (config.stage, config.image_tag, config.ecr_repository, region) == (
        "prod",
        tag,
        MODEL_NAME,
        "us-east-1",
    )
    assert config.architecture == "arm64"
    build = [json.loads(line) for line in fake_docker.read_text().splitlines()][1]["argv"]
    assert build[build.index("--platform") + 1] == "linux/arm64"  # image matches the function
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f"/{MODEL_NAME}:{tag}")
    assert json.loads(out[out.index("{") :])["stack"] == "visual-inspection-prod"


def test_failed_deploy_after_push_says_how_to_retry_the_deploy(
    env: Registry,
    promoted: Path,
    fake_docker: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from infra.deploy import DeployError

    def fail(config: Any, *, region: str | None, **review: bool) -> Any:
        raise DeployError(f"stack {config.stack_name} ended UPDATE_ROLLBACK_COMPLETE (Function: quota)")

    monkeypatch.setattr(release, "deploy_stage", fail)
    assert release.main(["--model-dir", str(promoted), "--region", "us-east-1", "--yes"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    tag = f"v1-{_git_short()}"
    assert err.startswith("release failed: ") and f"visual-inspection:{tag} is pushed" in err
    assert err.endswith(f"then: python -m infra.deploy --stage dev --image-tag {tag} --yes)")
    assert "UPDATE_ROLLBACK_COMPLETE" in err


def test_deploy_nobody_can_confirm_is_refused_before_building(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pytest's stdin is not a terminal and --yes is absent: the change set could not be confirmed.
    assert release.main(["--model-dir", str(promoted), "--region", "us-east-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("release refused: deploy: not executed: stdin is not a terminal")
    assert not fake_docker.exists()


def test_bad_deploy_knob_is_refused_before_anything_runs(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refusal(promoted, capsys, "-c", "memory_mb=99999")
    assert "--context memory_mb: must be an integer from 128 to 10240 (got 99999)" in err
    assert "unknown stage 'qa'" in _refusal(promoted, capsys, "--stage", "qa")
    assert not fake_docker.exists()
    assert boto3.client("ecr", region_name="us-east-1").describe_repositories()["repositories"] == []


def test_refuses_without_promoted_model(
    env: Registry, tmp_path: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert "no promoted model" in _refusal(empty, capsys)
    assert not fake_docker.exists()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"schema_version": 99}, "schema_version"),
        ({"model_sha256": "0" * 64}, "sha256"),
        ({"outputs": {"score": "pred_score"}}, "anomaly_map"),
    ],
)
def test_refuses_invalid_metadata(
    env: Registry,
    promoted: Path,
    fake_docker: Path,
    capsys: pytest.CaptureFixture[str],
    fields: dict[str, object],
    expected: str,
) -> None:
    _write_meta(promoted, **fields)
    err = _refusal(promoted, capsys)
    assert "metadata is invalid" in err and expected in err
    assert not fake_docker.exists()


def test_refuses_when_champion_is_another_version(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env.point_champion_at("2")
    err = _refusal(promoted, capsys)
    assert "does not match visual-inspection@champion" in err
    assert "registry_version '1' != champion version '2'" in err
    assert "run_id" in err
    assert not fake_docker.exists()
    assert boto3.client("ecr", region_name="us-east-1").describe_repositories()["repositories"] == []


def test_refuses_when_registry_onnx_differs(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Same version and run as the champion, but the registered ONNX bytes are not ours.
    env.point_champion_at("2")
    _write_meta(promoted, registry_version="2", run_id=env.run_ids["2"])
    err = _refusal(promoted, capsys)
    assert "registry ONNX sha256" in err
    assert not fake_docker.exists()


def test_refuses_when_registered_model_name_differs(
    env: Registry, promoted: Path, fake_docker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_meta(promoted, registered_model="someone-else")
    assert "registered_model 'someone-else'" in _refusal(promoted, capsys)


def test_refuses_without_champion_alias(
    env: Registry,
    promoted: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert "has no visual-inspection@champion" in _refusal(promoted, capsys)


def test_docker_commands_keep_the_password_out_of_argv() -> None:
    login = release.RegistryLogin(
        registry="https://1.dkr.ecr.eu-west-1.amazonaws.com", username="AWS", password="s3cr3t"
    )
    cmds = release.docker_commands(
        login=login,
        repository_uri="1.dkr.ecr.eu-west-1.amazonaws.com/vi",
        tag="v3-abc1234",
        build_args={"MODEL_VERSION": "3", "GIT_COMMIT": "abc"},
        context=Path("/ctx"),
        dockerfile=Path("/ctx/Dockerfile"),
        local_name="vi",
    )
    assert all("s3cr3t" not in " ".join(c.argv) and "s3cr3t" not in c.display() for c in cmds)
    assert cmds[0].stdin == "s3cr3t"
    assert cmds[1].argv == [
        "docker", "build", "--file", "/ctx/Dockerfile", "--platform", "linux/amd64", "--tag", "vi:v3-abc1234",
        "--build-arg", "GIT_COMMIT=abc", "--build-arg", "MODEL_VERSION=3", "/ctx",
    ]  # fmt: skip
    assert release.image_tag("3", "abc1234") == "v3-abc1234"
