"""cdk-nag's AWS Solutions pack on every stage's stack: the findings are exactly the accepted ones
below, each with its reason, so a regression (an API stage without access logs, an SNS topic
without TLS, a wildcard in the camera writer policy) fails here, and so does a fix that makes an
accepted finding obsolete (remove it from the list). A stack without access logs is checked as a
control, so a pack that stopped evaluating AwsSolutions-APIG1 cannot pass silently."""

from __future__ import annotations

from typing import Any

import pytest

# rule (with cdk-nag's finding detail) → why it is accepted for this stack
ACCEPTED: dict[str, str] = {
    "AwsSolutions-S1": "S3 server access logs need a second bucket; who wrote an object is in the API "
    "access log (request id → item → object key)",
    "AwsSolutions-IAM5[Resource::<Overlays30A55718.Arn>/results/*]": "the function writes one object "
    "per request under its own prefix, the reconciler deletes orphans there; keys are not known in advance",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:execute-api:<AWS::Region>:<AWS::AccountId>:"
    "<ApiF70053CD>/{stage}/GET/cameras/*/results/*]": "readers read every camera's results by design",
    "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:execute-api:<AWS::Region>:<AWS::AccountId>:"
    "<ApiF70053CD>/{stage}/GET/cameras/*/results]": "readers list every camera's results by design",
    "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
    "AmazonAPIGatewayPushToCloudWatchLogs]": "API Gateway's account logging role (api_cloudwatch_role) "
    "is the CDK's, with AWS's policy for exactly that purpose",
    "AwsSolutions-APIG2": "the body is a binary image; the handler validates it (type, size, ids)",
    "AwsSolutions-APIG3": "no WAF yet: IAM auth + the stage throttle bound what an unsigned caller can do",
    "AwsSolutions-APIG6": "execution logging would copy request data into logs; the access log names "
    "every caller and status instead",
    "AwsSolutions-COG4": "callers are IAM principals (cameras, readers), not Cognito users",
}


def _findings(scope: Any) -> dict[str, list[str]]:
    from cdk_nag import AwsSolutionsChecks

    report = AwsSolutionsChecks().validate_scope(scope)
    return {v.rule_name: sorted(r.construct_path for r in v.violating_resources) for v in report.violations}


@pytest.fixture(scope="module")
def nag() -> dict[str, dict[str, list[str]]]:
    import aws_cdk as cdk
    from aws_cdk import aws_apigateway as apigw

    from infra.config import load_stage
    from infra.stack import InspectionStack

    app = cdk.App()
    stacks = [InspectionStack(app, load_stage(stage, {"image_tag": "t"})) for stage in ("dev", "prod")]
    control = cdk.Stack(app, "NoAccessLog")
    api = apigw.RestApi(control, "Api", cloud_watch_role=False)
    api.root.add_method("GET", apigw.MockIntegration(), authorization_type=apigw.AuthorizationType.IAM)
    app.synth()
    return {stack.stack_name: _findings(stack) for stack in [*stacks, control]}


@pytest.mark.parametrize("stage", ["dev", "prod"])
def test_only_accepted_findings(nag: dict[str, dict[str, list[str]]], stage: str) -> None:
    found = nag[f"visual-inspection-{stage}"]
    accepted = {rule.replace("{stage}", stage) for rule in ACCEPTED}
    new, gone = sorted(set(found) - accepted), sorted(accepted - set(found))
    assert (new, gone) == ([], []), "update ACCEPTED (with a reason) or fix the finding"
    # The findings are fixed: access logs on, alarm topic TLS-only, no wildcard for cameras.
    for rule in ("AwsSolutions-APIG1", "AwsSolutions-SNS3", "AwsSolutions-DDB3", "AwsSolutions-S10"):
        assert rule not in found
    assert not [path for paths in found.values() for path in paths if "CameraWriterPolicy" in path]


def test_the_pack_flags_an_api_without_access_logs(nag: dict[str, dict[str, list[str]]]) -> None:
    assert "AwsSolutions-APIG1" in nag["NoAccessLog"]
