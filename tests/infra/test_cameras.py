"""Provisioning a camera: one command creates the IAM user at the camera path named by its id, with
the stage's writer policy and a key in a 0600 credentials file; bad ids are one line. Against moto's
IAM and CloudFormation (the stage's stack deployed from its synthesized template)."""

from __future__ import annotations

import configparser
import stat
from pathlib import Path

import boto3
import pytest

from infra.cameras import CAMERA_WRITER_POLICY_ID, CameraError, add_camera, camera_id_problem, main
from infra.deploy import deploy_template
from serving.identity import CAMERA_PATH, caller_from_event, camera_arn
from tests.infra.cfn_subset import moto_subset
from tests.infra.conftest import Synth


@pytest.mark.parametrize("camera_id", ["cam-1", "line1.cam_2", "C" * 64, "7"])
def test_ids_the_api_and_iam_both_accept(camera_id: str) -> None:
    assert camera_id_problem(camera_id) is None


@pytest.mark.parametrize(
    "camera_id",
    [
        "",
        "cam:1",  # the API allows ':', IAM user names do not
        "cam@1",  # IAM allows '@', the API does not
        "cam+1",
        "-cam",  # the API wants a letter or digit first
        "C" * 65,  # IAM user names are at most 64 characters
        "cam/1",
        "cam 1",
    ],
)
def test_other_ids_are_refused_in_one_line(camera_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert camera_id_problem(camera_id)
    assert main(["add", "--stage", "dev", "--", camera_id]) == 2  # refused before any AWS call
    err = capsys.readouterr().err
    assert err.startswith(f"camera: camera id {camera_id!r}: use 1-64 letters") and err.count("\n") == 1


@pytest.fixture
def dev_stack(synth: Synth, aws_env: str) -> str:
    """The dev stage's stack on moto's CloudFormation; returns its writer policy ARN."""
    template, _ = moto_subset(synth.template("dev"))
    cfn = boto3.client("cloudformation")
    name = synth.configs["dev"].stack_name
    deploy_template(cfn, name, template, poll=0.1, log=lambda _: None)
    detail = cfn.describe_stack_resource(StackName=name, LogicalResourceId=CAMERA_WRITER_POLICY_ID)
    return detail["StackResourceDetail"]["PhysicalResourceId"]


def test_add_creates_the_camera_user_key_file_and_writer_policy(
    dev_stack: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["add", "cam-1", "--stage", "dev", "--credentials-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "dev" / "cam-1.credentials"
    assert f"credentials: {path} (mode 0600" in out
    assert f"policy {dev_stack}:" in out and "/dev/POST/cameras/${aws:username}/images" in out

    iam = boto3.client("iam")
    user = iam.get_user(UserName="cam-1")["User"]
    account = boto3.client("sts").get_caller_identity()["Account"]
    assert user["Path"] == CAMERA_PATH and user["Arn"] == camera_arn(account, "cam-1")
    # The handler binds exactly this principal to camera cam-1.
    assert caller_from_event({"requestContext": {"identity": {"userArn": user["Arn"]}}}).camera_id == "cam-1"
    attached = iam.list_attached_user_policies(UserName="cam-1")["AttachedPolicies"]
    assert [p["PolicyArn"] for p in attached] == [dev_stack]
    assert iam.list_user_policies(UserName="cam-1")["PolicyNames"] == []
    (key,) = iam.list_access_keys(UserName="cam-1")["AccessKeyMetadata"]
    tags = {t["Key"]: t["Value"] for t in iam.list_user_tags(UserName="cam-1")["Tags"]}
    assert tags == {"project": "visual-inspection", "stage": "dev"}

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    parsed = configparser.ConfigParser()
    parsed.read(path)
    assert parsed["default"]["aws_access_key_id"] == key["AccessKeyId"]
    assert parsed["default"]["aws_secret_access_key"]
    # The key works, and it is the camera's (boto3 reads the file the way vi-client will).
    import botocore.session

    core = botocore.session.Session()
    core.set_config_variable("credentials_file", str(path))
    with monkeypatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env.delenv(name)  # else the environment's test keys win over the file
        assert core.get_credentials().access_key == key["AccessKeyId"]

    # Again: the credentials file is never overwritten; in another folder IAM refuses the duplicate.
    assert main(["add", "cam-1", "--stage", "dev", "--credentials-dir", str(tmp_path)]) == 2
    assert "cam-1.credentials exists" in capsys.readouterr().err
    assert main(["add", "cam-1", "--stage", "dev", "--credentials-dir", str(tmp_path / "b")]) == 2
    assert "camera 'cam-1' already exists" in capsys.readouterr().err
    assert len(iam.list_access_keys(UserName="cam-1")["AccessKeyMetadata"]) == 1
    assert not (tmp_path / "b" / "dev" / "cam-1.credentials").exists()

    assert main(["remove", "cam-1"]) == 0
    assert iam.list_users(PathPrefix=CAMERA_PATH)["Users"] == []


def test_a_failed_step_leaves_no_camera_and_remove_touches_only_cameras(
    dev_stack: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    iam = boto3.client("iam")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(OSError):
        add_camera(iam, "cam-2", policy_arn=dev_stack, credentials_file=blocker / "cam-2.credentials")
    assert iam.list_users(PathPrefix=CAMERA_PATH)["Users"] == []  # user, key, attachment undone

    iam.create_user(UserName="alice")  # a person, not a camera
    assert main(["remove", "alice"]) == 2
    assert "not a camera, not removed" in capsys.readouterr().err
    assert iam.get_user(UserName="alice")["User"]["UserName"] == "alice"
    assert main(["remove", "cam-9"]) == 2
    assert "no camera 'cam-9'" in capsys.readouterr().err
    with pytest.raises(CameraError, match="use 1-64"):
        add_camera(iam, "cam:2", policy_arn=dev_stack, credentials_file=tmp_path / "x")


def test_add_without_a_deployed_stage_says_to_deploy_first(
    aws_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["add", "cam-3", "--stage", "prod", "--credentials-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("camera: stack visual-inspection-prod has no CameraWriterPolicy")
    assert "deploy the stage first" in err and "\n" not in err
    assert boto3.client("iam").list_users()["Users"] == []
