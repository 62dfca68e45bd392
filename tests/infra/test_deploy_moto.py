"""Deploy the synthesized stack to moto's CloudFormation (a real local AWS endpoint on 127.0.0.1)
with ``infra.deploy`` — the code a release runs — then let the real handler write to the table
and bucket that CloudFormation created, configured from the created function's environment.

moto cannot create every resource type the stack uses; ``tests/infra/cfn_subset.py`` drops those
(and what refers to them) and this test asserts exactly which were dropped, so the list of what
is not exercised locally is checked, not just claimed.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from infra.deploy import DeployError, deploy_template
from serving.storage import TABLE_SCHEMA, TTL_ATTRIBUTE
from tests.infra.cfn_subset import MOTO_UNSUPPORTED_TYPES, moto_subset
from tests.infra.conftest import Synth
from tests.serving.conftest import image_bytes

# Supported by moto but dropped because they refer to an unsupported resource (the Method
# integrates the Lambda alias; the dashboard shows the alarms' status).
DROPPED_AS_DEPENDANTS = {"AWS::ApiGateway::Method", "AWS::CloudWatch::Dashboard"}


def rest_event(body: bytes, camera_id: str, request_id: str) -> dict[str, Any]:
    """What API Gateway (REST, proxy integration, binary media type) sends for a camera upload."""
    return {
        "resource": "/cameras/{camera_id}/images",
        "path": f"/cameras/{camera_id}/images",
        "httpMethod": "POST",
        "headers": {"content-type": "image/png"},
        "multiValueHeaders": {"content-type": ["image/png"]},
        "pathParameters": {"camera_id": camera_id},
        "requestContext": {"requestId": request_id, "stage": "full", "httpMethod": "POST"},
        "body": base64.b64encode(body).decode(),
        "isBase64Encoded": True,
    }


def test_stack_deploys_to_local_cloudformation_and_the_handler_writes_to_its_resources(
    synth: Synth, aws_env: str, serving_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = synth.configs["full"]  # retention/TTL, originals kept, non-default prefix
    template, dropped = moto_subset(synth.template("full"))
    present = {r["Type"] for r in synth.template("full")["Resources"].values()}
    # full has no account-wide API Gateway logging role (api_cloudwatch_role: false)
    assert MOTO_UNSUPPORTED_TYPES - present == {"AWS::ApiGateway::Account"}
    assert set(dropped.values()) == (MOTO_UNSUPPORTED_TYPES & present) | DROPPED_AS_DEPENDANTS
    kept = {r["Type"] for r in template["Resources"].values()}
    assert {
        "AWS::DynamoDB::Table",
        "AWS::S3::Bucket",
        "AWS::IAM::Role",
        "AWS::IAM::Policy",
        "AWS::Lambda::Function",
        "AWS::Logs::LogGroup",
        "AWS::ApiGateway::RestApi",
        "AWS::ApiGateway::Resource",
        "AWS::IAM::ManagedPolicy",
        "AWS::SNS::Topic",
    } <= kept

    cfn = boto3.client("cloudformation")
    result = deploy_template(cfn, config.stack_name, template, poll=0.1, log=lambda _: None)
    assert result.action == "created"
    # moto does not report Outputs for stacks created through a change set (real CloudFormation
    # does; deploy prints them), so the physical names come from the stack's resource list.
    created = {
        r["LogicalResourceId"]: r["PhysicalResourceId"]
        for r in cfn.list_stack_resources(StackName=config.stack_name)["StackResourceSummaries"]
        if r["ResourceStatus"] == "CREATE_COMPLETE"
    }
    assert set(created) == set(template["Resources"])
    by_type = {template["Resources"][rid]["Type"]: pid for rid, pid in created.items()}
    table, bucket = by_type["AWS::DynamoDB::Table"], by_type["AWS::S3::Bucket"]

    # The table CloudFormation made has serving's key schema and index.
    ddb = boto3.client("dynamodb")
    described = ddb.describe_table(TableName=table)["Table"]
    assert described["KeySchema"] == TABLE_SCHEMA["KeySchema"]
    assert sorted(described["AttributeDefinitions"], key=str) == sorted(
        TABLE_SCHEMA["AttributeDefinitions"], key=str
    )
    (gsi,) = described["GlobalSecondaryIndexes"]
    (expected_gsi,) = TABLE_SCHEMA["GlobalSecondaryIndexes"]
    assert (gsi["IndexName"], gsi["KeySchema"], gsi["Projection"]) == (
        expected_gsi["IndexName"],
        expected_gsi["KeySchema"],
        expected_gsi["Projection"],
    )
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"

    s3 = boto3.client("s3")
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    # (moto ignores PublicAccessBlockConfiguration in templates; test_stack.py asserts it.)

    # The function CloudFormation made: image, role, and the environment the handler reads.
    described_fn = boto3.client("lambda").get_function(FunctionName=by_type["AWS::Lambda::Function"])
    function = described_fn["Configuration"]
    # (moto reports PackageType "Zip" for CloudFormation-made functions; the image URI is kept.)
    assert described_fn["Code"]["ImageUri"].endswith(f"/{config.ecr_repository}@{config.image_digest}")
    assert function["MemorySize"] == config.memory_mb and function["Timeout"] == config.timeout_s
    env = function["Environment"]["Variables"]
    assert (env["RESULTS_TABLE"], env["RESULTS_BUCKET"]) == (table, bucket)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MODEL_DIR", str(serving_model_dir))  # the image's copy lives at /var/task

    from serving.service import InferenceService

    service = InferenceService.from_env()
    response = service.handle(rest_event(image_bytes(), "line-1-cam-2", "req-0001"))
    assert response["statusCode"] == 200, response["body"]
    body = json.loads(response["body"])
    assert body["camera_id"] == "line-1-cam-2" and body["request_id"] == "req-0001"

    item = ddb.get_item(
        TableName=table, Key={"camera_id": {"S": "line-1-cam-2"}, "request_id": {"S": "req-0001"}}
    )
    assert "Item" in item
    # The stage keeps results 30 days: the item carries the TTL attribute the table expires on.
    expires = int(item["Item"][TTL_ATTRIBUTE]["N"])
    assert abs(expires - (time.time() + config.retention_days * 86400)) < 600
    # (moto ignores TimeToLiveSpecification in templates; test_stack.py asserts it.)
    overlay_key = item["Item"]["overlay_key"]["S"]
    assert overlay_key.startswith(f"{config.results_prefix}line-1-cam-2/")
    assert s3.head_object(Bucket=bucket, Key=overlay_key)["ContentType"] == "image/png"
    original_key = item["Item"]["original_key"]["S"]  # store_original is on in this stage
    assert s3.get_object(Bucket=bucket, Key=original_key)["Body"].read() == image_bytes()

    # Exactly the objects the item references are stored (overlay, original, any others).
    referenced = {v["S"] for k, v in item["Item"].items() if k.endswith("_key")}
    assert {overlay_key, original_key} <= referenced
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == referenced

    # Deploying the same template again changes nothing.
    again = deploy_template(cfn, config.stack_name, template, poll=0.1, log=lambda _: None)
    assert again.action == "unchanged"


def test_function_role_may_write_its_prefix_only_under_enforced_iam(synth: Synth, aws_env: str) -> None:
    """With moto's IAM enforcement on, the created role's credentials write objects under the
    stage's prefix and are denied anywhere else. (moto evaluates S3 object ARNs; for DynamoDB it
    matches every action against ``*``, which a least-privilege policy never grants, so table
    access cannot be checked this way: test_stack.py checks those statements.)"""
    import urllib.request

    from botocore.exceptions import ClientError

    config = synth.configs["full"]
    template, _ = moto_subset(synth.template("full"))
    cfn = boto3.client("cloudformation")
    deploy_template(cfn, config.stack_name, template, poll=0.1, log=lambda _: None)
    created = {
        r["ResourceType"]: r["PhysicalResourceId"]
        for r in cfn.list_stack_resources(StackName=config.stack_name)["StackResourceSummaries"]
    }
    bucket = created["AWS::S3::Bucket"]
    boto3.client("s3").create_bucket(Bucket="someone-elses-bucket")
    role_arn = boto3.client("iam").get_role(RoleName=created["AWS::IAM::Role"])["Role"]["Arn"]
    creds = boto3.client("sts").assume_role(RoleArn=role_arn, RoleSessionName="function")["Credentials"]
    s3 = boto3.client(
        "s3",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )

    def enforce(count: str) -> None:
        request = urllib.request.Request(
            f"{aws_env}/moto-api/reset-auth",
            data=count.encode(),
            headers={"content-type": "text/plain"},  # a form type would be parsed away
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()

    enforce("0")  # from now on every call is authenticated and authorized
    try:
        key = f"{config.results_prefix}cam/2026/01/01/r-overlay.png"
        s3.put_object(Bucket=bucket, Key=key, Body=b"png")
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"png"
        s3.delete_object(Bucket=bucket, Key=key)
        for target_bucket, target_key in ((bucket, "elsewhere/x.png"), ("someone-elses-bucket", key)):
            with pytest.raises(ClientError, match="AccessDenied"):
                s3.put_object(Bucket=target_bucket, Key=target_key, Body=b"png")
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.delete_bucket(Bucket=bucket)
    finally:
        enforce("inf")


def test_deploy_refuses_a_stack_that_is_busy_or_rolled_back() -> None:
    class FakeStatus:
        """Only ``describe_stacks`` is needed: the refusal happens before any change set."""

        def __init__(self, status: str) -> None:
            self.status = status

        def describe_stacks(self, StackName: str) -> dict[str, Any]:
            return {"Stacks": [{"StackStatus": self.status}]}

    with pytest.raises(DeployError, match=r"ROLLBACK_COMPLETE.*delete-stack --stack-name s1"):
        deploy_template(FakeStatus("ROLLBACK_COMPLETE"), "s1", {"Resources": {}})
    with pytest.raises(DeployError, match="busy"):
        deploy_template(FakeStatus("UPDATE_IN_PROGRESS"), "s1", {"Resources": {}})
    big = {"Resources": {"X": {"Type": "AWS::SNS::Topic", "Properties": {"DisplayName": "x" * 60_000}}}}
    with pytest.raises(DeployError, match="51200 inline"):
        deploy_template(FakeStatus("CREATE_COMPLETE"), "s1", big)
