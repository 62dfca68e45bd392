"""Assertions on the synthesized CloudFormation templates of every stage (no AWS needed).

What is checked is what a reviewer would try to break: a route without auth, a table whose keys
drift from the handler's, a public or unencrypted bucket, a role with wildcards, a payload limit
the API cannot deliver, knobs that do not reach the template.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aws_cdk.assertions import Match, Template

from infra.cameras import CAMERA_WRITER_POLICY_ID
from infra.config import MAX_DELIVERABLE_BODY_BYTES
from infra.deploy import MAX_TEMPLATE_BODY_BYTES, show
from infra.stack import BINARY_MEDIA_TYPES, S3_EXPIRY_GRACE_DAYS, route_path_pattern
from serving.events import IMAGE_CONTENT_TYPES
from serving.identity import CAMERA_PATH
from serving.routes import SCORE_ROUTE
from serving.storage import TABLE_SCHEMA, TTL_ATTRIBUTE
from tests.infra.conftest import IMAGE_TAG, Synth
from tools.local_server import ROUTES

LABELS = ("dev", "prod", "full")


def resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {rid: r for rid, r in template["Resources"].items() if r["Type"] == kind}


def only(template: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.items()))


def scorer(template: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The scoring function (the container image; the reconciler is inline code)."""
    (found,) = [
        (rid, r)
        for rid, r in resources(template, "AWS::Lambda::Function").items()
        if r["Properties"].get("PackageType") == "Image"
    ]
    return found


def api_routes(template: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(method, /path/{param}): Method properties}`` rebuilt from the Resource tree."""
    parts = {rid: r["Properties"] for rid, r in resources(template, "AWS::ApiGateway::Resource").items()}

    def path(parent: Any) -> str:
        if isinstance(parent, dict) and "Ref" in parent:
            props = parts[parent["Ref"]]
            return f"{path(props['ParentId'])}/{props['PathPart']}"
        return ""  # Fn::GetAtt [Api, RootResourceId]

    routes = {}
    for method in resources(template, "AWS::ApiGateway::Method").values():
        props = method["Properties"]
        routes[(props["HttpMethod"], path(props["ResourceId"]) or "/")] = props
    return routes


@pytest.mark.parametrize("label", LABELS)
def test_every_serving_route_requires_iam_auth(synth: Synth, label: str) -> None:
    template = synth.template(label)
    routes = api_routes(template)
    assert set(routes) == set(ROUTES)  # exactly serving's routes, no extra (unauthenticated) ones
    for key, props in routes.items():
        assert props["AuthorizationType"] == "AWS_IAM", key
        assert props["Integration"]["Type"] == "AWS_PROXY"
    Template.from_json(template).all_resources_properties(
        "AWS::ApiGateway::Method", {"AuthorizationType": "AWS_IAM"}
    )
    _, api = only(template, "AWS::ApiGateway::RestApi")
    # The handler refuses binary bodies API Gateway did not base64-encode: every image type it
    # accepts must be a binary media type.
    assert set(IMAGE_CONTENT_TYPES) <= set(api["Properties"]["BinaryMediaTypes"]) == set(BINARY_MEDIA_TYPES)
    _, stage = only(template, "AWS::ApiGateway::Stage")
    config = synth.configs[label]
    assert stage["Properties"]["StageName"] == config.stage
    throttle = stage["Properties"]["MethodSettings"][0]
    rate, burst = throttle["ThrottlingRateLimit"], throttle["ThrottlingBurstLimit"]
    assert (rate, burst) == config.stage_throttle
    # Overload is API Gateway's 429: the stage never admits more than the reserved instances serve
    # at the measured latency, nor more at once than there are instances.
    assert config.reserved_concurrency is not None
    assert rate <= config.reserved_concurrency / (config.request_latency_ms / 1000)
    assert burst <= config.reserved_concurrency
    if config.throttle_rate is None:  # derived: reserved / latency x safety factor (to 0.1/s)
        served_per_s = config.reserved_concurrency / (config.request_latency_ms / 1000)
        admitted = served_per_s * config.throttle_safety_factor
        assert admitted - 0.1 < rate <= admitted
        assert burst == config.reserved_concurrency
    else:
        assert (rate, burst) == (config.throttle_rate, config.throttle_burst)


@pytest.mark.parametrize("label", LABELS)
def test_table_is_servings_schema_on_demand_with_pitr(synth: Synth, label: str) -> None:
    _, table = only(synth.template(label), "AWS::DynamoDB::Table")
    props = table["Properties"]
    assert props["KeySchema"] == TABLE_SCHEMA["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=str) == sorted(
        TABLE_SCHEMA["AttributeDefinitions"], key=str
    )
    assert props["GlobalSecondaryIndexes"] == TABLE_SCHEMA["GlobalSecondaryIndexes"]
    assert props["BillingMode"] == TABLE_SCHEMA["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert props["SSESpecification"]["SSEEnabled"] is True
    config = synth.configs[label]
    if config.retention_days:
        assert props["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    else:
        assert "TimeToLiveSpecification" not in props
    assert table["DeletionPolicy"] == ("Retain" if config.retain_data else "Delete")


@pytest.mark.parametrize("label", LABELS)
def test_bucket_encrypted_private_tls_only_with_lifecycle(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    bucket_id, bucket = only(template, "AWS::S3::Bucket")
    props = bucket["Properties"]
    assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "ServerSideEncryptionByDefault"
    ] == {"SSEAlgorithm": "AES256"}
    assert props["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    assert props["OwnershipControls"]["Rules"] == [{"ObjectOwnership": "BucketOwnerEnforced"}]
    rules = {r["Id"]: r for r in props["LifecycleConfiguration"]["Rules"]}
    assert rules["abort-incomplete-uploads"]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    if config.retention_days:
        expire = rules["expire-results"]
        assert expire["Prefix"] == config.results_prefix
        assert expire["ExpirationInDays"] == config.retention_days + S3_EXPIRY_GRACE_DAYS
    else:
        assert "expire-results" not in rules
    _, policy = only(template, "AWS::S3::BucketPolicy")
    assert policy["Properties"]["Bucket"] == {"Ref": bucket_id}
    deny = [s for s in policy["Properties"]["PolicyDocument"]["Statement"] if s["Effect"] == "Deny"]
    assert any(
        s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} and s["Action"] == "s3:*" for s in deny
    )


def _function_role_statements(template: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    _, function = scorer(template)
    role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
    role = template["Resources"][role_id]
    assert "ManagedPolicyArns" not in role["Properties"]  # no AWS managed policy (they use "*")
    assert "Policies" not in role["Properties"]
    statements = []
    for policy in resources(template, "AWS::IAM::Policy").values():
        if {"Ref": role_id} in policy["Properties"]["Roles"]:
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    return role_id, statements


def _resource_strings(resource: Any) -> str:
    """A resource expression flattened to text: literals and the logical ids it references."""
    return json.dumps(resource, sort_keys=True)


@pytest.mark.parametrize("label", LABELS)
def test_function_role_is_least_privilege(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    table_id, _ = only(template, "AWS::DynamoDB::Table")
    bucket_id, _ = only(template, "AWS::S3::Bucket")
    _, function = scorer(template)
    logs_id = function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]
    _, statements = _function_role_statements(template)
    assert statements
    granted: dict[str, list[Any]] = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        res = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in actions:
            assert "*" not in action, f"wildcard action {action}"
            granted.setdefault(action, []).extend(res)
        for resource in res:
            assert resource != "*"
            text = _resource_strings(resource)
            # Every resource is one of this stack's own: the table (or its index), the bucket's
            # own prefix, the function's log group. A '*' only appears as the tail of the prefix.
            owners = [rid for rid in (table_id, bucket_id, logs_id) if rid in text]
            assert len(owners) == 1, text
            if "*" in text:
                assert owners == [bucket_id] and f'"/{config.results_prefix}*"' in text, text
        if actions == ["s3:ListBucket"]:  # the bucket itself, only for keys under the prefix
            assert statement["Condition"] == {"StringLike": {"s3:prefix": [f"{config.results_prefix}*"]}}
        else:
            assert "Condition" not in statement
    assert set(granted) == {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:Query",
        "s3:ListBucket",
        "s3:PutObject",
        "s3:GetObject",
        "s3:DeleteObject",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }
    index_arn = {
        "Fn::Join": [
            "",
            [
                {"Fn::GetAtt": [table_id, "Arn"]},
                f"/index/{TABLE_SCHEMA['GlobalSecondaryIndexes'][0]['IndexName']}",
            ],
        ]
    }
    assert index_arn in granted["dynamodb:Query"]


@pytest.mark.parametrize("label", LABELS)
def test_function_runs_the_pushed_image_with_the_handlers_environment(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    table_id, _ = only(template, "AWS::DynamoDB::Table")
    bucket_id, _ = only(template, "AWS::S3::Bucket")
    _, function = scorer(template)
    props = function["Properties"]
    assert props["PackageType"] == "Image"
    image_uri = json.dumps(props["Code"]["ImageUri"])
    assert f"/{config.ecr_repository}" in image_uri
    if config.image_digest:
        assert f"@{config.image_digest}" in image_uri
    else:
        assert f":{IMAGE_TAG}" in image_uri
    assert props["MemorySize"] == config.memory_mb
    assert props["Timeout"] == config.timeout_s
    assert props["Architectures"] == [config.architecture]
    assert props.get("ReservedConcurrentExecutions") == config.reserved_concurrency
    env = props["Environment"]["Variables"]
    assert env["RESULTS_TABLE"] == {"Ref": table_id}
    assert env["RESULTS_BUCKET"] == {"Ref": bucket_id}
    assert env["RESULTS_PREFIX"] == config.results_prefix
    assert env["STORE_ORIGINAL"] == str(config.store_original).lower()
    assert env["REQUIRE_CAMERA_ID"] == str(config.require_camera_id).lower()
    assert int(env["MAX_BODY_BYTES"]) == config.max_body_bytes <= MAX_DELIVERABLE_BODY_BYTES
    assert env["MODEL_DIR"] == "/var/task/serving/model"
    assert env.get("RESULTS_TTL_DAYS") == (str(config.retention_days) if config.retention_days else None)
    _, alias = only(template, "AWS::Lambda::Alias")
    provisioned = alias["Properties"].get("ProvisionedConcurrencyConfig")
    if config.provisioned_concurrency:
        assert provisioned == {"ProvisionedConcurrentExecutions": config.provisioned_concurrency}
    else:
        assert provisioned is None
    # API Gateway invokes the alias (so provisioned concurrency serves every request).
    for method in api_routes(template).values():
        assert (
            json.dumps(method["Integration"]["Uri"]).count(
                alias_id := next(iter(resources(template, "AWS::Lambda::Alias")))
            )
            == 1
        ), alias_id


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Alarm properties by the metric they watch (the 5xx alarm's math by its error metric)."""
    alarms = {}
    for alarm in resources(template, "AWS::CloudWatch::Alarm").values():
        stats = [m["MetricStat"] for m in alarm["Properties"]["Metrics"] if "MetricStat" in m]
        names = sorted(stat["Metric"]["MetricName"] for stat in stats)
        key = "5XXError" if "5XXError" in names else names[0]
        alarms[key] = {**alarm["Properties"], "Stats": {s["Metric"]["MetricName"]: s for s in stats}}
    return alarms


@pytest.mark.parametrize("label", LABELS)
def test_every_alarm_notifies_the_topic_with_its_threshold(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    alarms = _alarms(template)
    assert set(alarms) == {"5XXError", "Latency", "Throttles"}
    topic_id, _ = only(template, "AWS::SNS::Topic")  # always, e-mail or not
    for name, alarm in alarms.items():
        assert alarm["AlarmActions"] == [{"Ref": topic_id}], name
        assert alarm["OKActions"] == [{"Ref": topic_id}], name
        assert alarm["TreatMissingData"] == "notBreaching", name
    assert template["Outputs"]["AlarmTopicArn"]["Value"] == {"Ref": topic_id}

    # 5xx: a rate only over periods with enough requests (one error in a quiet period is not paged).
    errors = alarms["5XXError"]
    assert errors["Threshold"] == config.alarm_5xx_rate
    assert errors["ComparisonOperator"] == "GreaterThanThreshold"
    (expression,) = [m for m in errors["Metrics"] if "Expression" in m]
    assert expression["ReturnData"] is True
    assert expression["Expression"] == (
        f"IF(requests >= {config.alarm_5xx_min_requests}, FILL(errors, 0) / requests, 0)"
    )
    ids = {m["Id"]: m["MetricStat"]["Metric"]["MetricName"] for m in errors["Metrics"] if "MetricStat" in m}
    assert ids == {"requests": "Count", "errors": "5XXError"}
    assert all(s["Stat"] == "Sum" and s["Period"] == 300 for s in errors["Stats"].values())
    assert _math_5xx(expression["Expression"], requests=1, errors=1) == 0  # quiet period, one error
    assert _math_5xx(expression["Expression"], requests=200, errors=20) > errors["Threshold"]

    latency = alarms["Latency"]
    assert latency["Stats"]["Latency"]["Stat"] == "p95"
    assert latency["Threshold"] == config.alarm_p95_latency_ms and latency["EvaluationPeriods"] == 2
    throttles = alarms["Throttles"]
    assert throttles["Threshold"] == config.alarm_throttles
    assert throttles["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"

    subscriptions = resources(template, "AWS::SNS::Subscription")
    if config.alarm_email:
        Template.from_json(template).has_resource_properties(
            "AWS::SNS::Subscription",
            {"Protocol": "email", "Endpoint": config.alarm_email, "TopicArn": {"Ref": topic_id}},
        )
    else:
        assert subscriptions == {}
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    assert "5XXError" in body and "p95" in body and "Throttles" in body


def _math_5xx(expression: str, *, requests: float, errors: float) -> float:
    """Evaluate the alarm's ``IF(requests >= N, FILL(errors, 0) / requests, 0)`` for one period."""
    found = re.fullmatch(r"IF\(requests >= (\d+), FILL\(errors, 0\) / requests, 0\)", expression)
    assert found, expression
    return errors / requests if requests >= int(found.group(1)) else 0.0


@pytest.mark.parametrize("label", LABELS)
def test_function_logs_json_with_retention(synth: Synth, label: str) -> None:
    template = synth.template(label)
    _, function = scorer(template)
    log_group = template["Resources"][function["Properties"]["LoggingConfig"]["LogGroup"]["Ref"]]
    assert log_group["Properties"]["RetentionInDays"] == synth.configs[label].log_retention_days
    Template.from_json(template).has_resource_properties(
        "AWS::Lambda::Function",
        {"LoggingConfig": {"LogFormat": "JSON", "LogGroup": {"Ref": Match.any_value()}}},
    )


@pytest.mark.parametrize("label", LABELS)
def test_api_access_log_names_the_caller_of_every_request(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    _, stage = only(template, "AWS::ApiGateway::Stage")
    setting = stage["Properties"]["AccessLogSetting"]
    group_id = setting["DestinationArn"]["Fn::GetAtt"][0]
    group = template["Resources"][group_id]
    assert group["Type"] == "AWS::Logs::LogGroup"
    assert group["Properties"]["RetentionInDays"] == config.access_log_retention_days
    assert group["DeletionPolicy"] == ("Retain" if config.retain_data else "Delete")
    assert template["Outputs"]["AccessLogGroup"]["Value"] == {"Ref": group_id}
    # What API Gateway writes for a camera's upload: substitute $context variables, parse as JSON.
    sample = {
        "$context.identity.userArn": "arn:aws:iam::123456789012:user/visual-inspection/cameras/cam-1",
        "$context.identity.caller": "AIDAEXAMPLE",
        "$context.identity.sourceIp": "203.0.113.9",
        "$context.resourcePath": "/cameras/{camera_id}/images",
        "$context.status": "403",
        "$context.responseLatency": "12",
        "$context.requestTimeEpoch": "1767225600000",
        "$context.responseLength": "57",
    }
    line = setting["Format"]
    for variable, value in sorted(sample.items(), key=lambda kv: -len(kv[0])):
        line = line.replace(variable, value)
    line = re.sub(r"\$context\.[A-Za-z.]+", "x", line)
    record = json.loads(line)
    assert record["userArn"] == sample["$context.identity.userArn"]
    assert record["caller"] == "AIDAEXAMPLE" and record["sourceIp"] == "203.0.113.9"
    assert record["resourcePath"] == "/cameras/{camera_id}/images"
    assert record["status"] == 403 and record["responseLatency"] == 12  # numbers, for Insights filters
    assert {"requestId", "httpMethod", "path", "accessKey", "integrationRequestId"} <= set(record)
    accounts = resources(template, "AWS::ApiGateway::Account")
    if config.api_cloudwatch_role:  # access logging needs the account-wide role; kept on delete
        ((account_id, account),) = accounts.items()
        assert account["DeletionPolicy"] == "Retain"
        assert account_id in stage["DependsOn"]
    else:
        assert accounts == {}


@pytest.mark.parametrize("label", LABELS)
def test_camera_writes_only_as_itself_and_reading_is_a_separate_policy(synth: Synth, label: str) -> None:
    template = synth.template(label)
    config = synth.configs[label]
    policies = resources(template, "AWS::IAM::ManagedPolicy")
    assert CAMERA_WRITER_POLICY_ID in policies  # fixed logical id: `infra.cameras add` finds it
    assert "CameraInvokePolicy" not in json.dumps(template)  # the all-cameras policy is gone
    (reader_id,) = set(policies) - {CAMERA_WRITER_POLICY_ID}
    (writer,) = policies[CAMERA_WRITER_POLICY_ID]["Properties"]["PolicyDocument"]["Statement"]
    assert writer["Effect"] == "Allow" and writer["Action"] == "execute-api:Invoke"
    method, route = SCORE_ROUTE
    arn = show(writer["Resource"])  # one resource: POST to the caller's own camera id only
    assert arn.endswith(f"/{config.stage}/{method}{route.replace('{camera_id}', '${aws:username}')}")
    assert "*" not in arn.split(f"/{config.stage}/")[1]
    assert show(writer["Condition"]["ArnLike"]["aws:PrincipalArn"]) == (
        f"arn:${{AWS::Partition}}:iam::${{AWS::AccountId}}:user{CAMERA_PATH}*"
    )
    assert template["Outputs"]["CameraWriterPolicyArn"]["Value"] == {"Ref": CAMERA_WRITER_POLICY_ID}

    (reader,) = policies[reader_id]["Properties"]["PolicyDocument"]["Statement"]
    assert reader["Action"] == "execute-api:Invoke" and "Condition" not in reader
    granted = {show(r).split(f"/{config.stage}/")[1] for r in reader["Resource"]}
    assert granted == {f"GET{route_path_pattern(t)}" for m, t in ROUTES if m == "GET"}
    assert template["Outputs"]["ResultsReaderPolicyArn"]["Value"] == {"Ref": reader_id}


@pytest.mark.parametrize("label", LABELS)
def test_template_fits_inline_deploy_and_has_no_bootstrap(synth: Synth, label: str) -> None:
    template = synth.template(label)
    assert len(json.dumps(template, separators=(",", ":"))) < MAX_TEMPLATE_BODY_BYTES
    # Bootstrapless: no BootstrapVersion parameter/rule, no asset parameters (the image is in ECR).
    assert "Parameters" not in template and "Rules" not in template


def test_cfn_lint_is_clean(synth: Synth) -> None:
    from cfnlint.api import lint

    for label in LABELS:
        matches = lint(json.dumps(synth.template(label)), regions=["us-east-1"])
        assert [str(m) for m in matches] == [], label
