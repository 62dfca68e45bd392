"""Reviewed deploys: the change set is shown (added, modified, replaced, removed, IAM statements),
confirmed or refused, and never replaces the results table or bucket without ``--allow-replace``.

moto's CloudFormation describes a change set's Add/Modify/Remove actions but not ``Replacement``
or ``Details``, so the replacement decisions run on recorded ``describe_change_set`` answers in
CloudFormation's format (``RECORDED_*``); the listing and the IAM diff run on moto as well.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import boto3
import pytest

from infra.deploy import (
    ChangeSetReview,
    DeployRefused,
    ResourceChange,
    ask_on_terminal,
    deploy_template,
    iam_changes,
    main,
    require_reviewer,
    show,
)
from tests.infra.cfn_subset import moto_subset
from tests.infra.conftest import Synth

# describe_change_set for a key-schema change of the table (CloudFormation's answer, trimmed to the
# fields read): the table is replaced, the function is modified in place, a version is added.
RECORDED_TABLE_KEY_CHANGE: dict[str, Any] = {
    "ChangeSetName": "deploy-20260101-000000-abcdef",
    "Status": "CREATE_COMPLETE",
    "Changes": [
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Modify",
                "LogicalResourceId": "Results25575328",
                "PhysicalResourceId": "visual-inspection-prod-Results25575328-1ABC",
                "ResourceType": "AWS::DynamoDB::Table",
                "Replacement": "True",
                "Scope": ["Properties"],
                "Details": [
                    {
                        "Target": {
                            "Attribute": "Properties",
                            "Name": "KeySchema",
                            "RequiresRecreation": "Always",
                        },
                        "Evaluation": "Static",
                        "ChangeSource": "DirectModification",
                    },
                    {
                        "Target": {
                            "Attribute": "Properties",
                            "Name": "AttributeDefinitions",
                            "RequiresRecreation": "Never",
                        },
                        "Evaluation": "Static",
                        "ChangeSource": "DirectModification",
                    },
                ],
            },
        },
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Modify",
                "LogicalResourceId": "Function76856677",
                "PhysicalResourceId": "visual-inspection-prod-Function-XYZ",
                "ResourceType": "AWS::Lambda::Function",
                "Replacement": "False",
                "Scope": ["Properties"],
                "Details": [
                    {
                        "Target": {
                            "Attribute": "Properties",
                            "Name": "Environment",
                            "RequiresRecreation": "Never",
                        },
                        "Evaluation": "Dynamic",
                        "ChangeSource": "ResourceAttribute",
                        "CausingEntity": "Results25575328",
                    }
                ],
            },
        },
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Add",
                "LogicalResourceId": "FunctionCurrentVersion4E2B2261new",
                "ResourceType": "AWS::Lambda::Version",
                "Scope": [],
                "Details": [],
            },
        },
    ],
}
# A renamed bucket construct: a new bucket is added and the old one removed (no "Replacement").
RECORDED_BUCKET_REMOVED: dict[str, Any] = {
    "Status": "CREATE_COMPLETE",
    "Changes": [
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Add",
                "LogicalResourceId": "Images1234",
                "ResourceType": "AWS::S3::Bucket",
            },
        },
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Remove",
                "LogicalResourceId": "Overlays30A55718",
                "PhysicalResourceId": "visual-inspection-prod-overlays-1",
                "ResourceType": "AWS::S3::Bucket",
                "PolicyAction": "Retain",
            },
        },
    ],
}
# The image tag changed: the function is modified in place, nothing stored is touched.
RECORDED_NEW_IMAGE: dict[str, Any] = {
    "Status": "CREATE_COMPLETE",
    "Changes": [
        {
            "Type": "Resource",
            "ResourceChange": {
                "Action": "Modify",
                "LogicalResourceId": "Function76856677",
                "ResourceType": "AWS::Lambda::Function",
                "Replacement": "False",
                "Details": [
                    {"Target": {"Attribute": "Properties", "Name": "Code", "RequiresRecreation": "Never"}}
                ],
            },
        }
    ],
}


class RecordedCloudFormation:
    """An existing stack whose next change set describes as ``described`` (recorded answers);
    records every call, so a test can see whether anything was executed or deleted."""

    def __init__(self, described: dict[str, Any], deployed: dict[str, Any], protected: bool = False) -> None:
        self.described = copy.deepcopy(described)
        self.deployed = deployed
        self.protected = protected
        self.calls: list[str] = []
        self.status = "UPDATE_COMPLETE"

    def describe_stacks(self, StackName: str) -> dict[str, Any]:
        self.calls.append("describe_stacks")
        return {
            "Stacks": [
                {"StackStatus": self.status, "EnableTerminationProtection": self.protected, "Outputs": []}
            ]
        }

    def create_change_set(self, **kwargs: Any) -> dict[str, str]:
        self.calls.append(f"create_change_set:{kwargs['ChangeSetType']}")
        return {"Id": "arn:change-set/1"}

    def describe_change_set(self, ChangeSetName: str, StackName: str, **_: Any) -> dict[str, Any]:
        self.calls.append("describe_change_set")
        return self.described

    def get_template(self, StackName: str, TemplateStage: str) -> dict[str, Any]:
        return {"TemplateBody": self.deployed}

    def delete_change_set(self, ChangeSetName: str, StackName: str) -> None:
        self.calls.append("delete_change_set")

    def execute_change_set(self, ChangeSetName: str, StackName: str) -> None:
        self.calls.append("execute_change_set")

    def update_termination_protection(self, StackName: str, EnableTerminationProtection: bool) -> None:
        self.calls.append(f"update_termination_protection:{EnableTerminationProtection}")
        self.protected = EnableTerminationProtection


def _deploy(cfn: Any, template: dict[str, Any], **kwargs: Any) -> Any:
    logged: list[str] = []
    result = deploy_template(cfn, "visual-inspection-prod", template, poll=0, log=logged.append, **kwargs)
    return result, "\n".join(logged)


def test_changes_are_parsed_and_rendered_with_replacements() -> None:
    changes = tuple(ResourceChange.from_api(c) for c in RECORDED_TABLE_KEY_CHANGE["Changes"])
    table, function, version = changes
    assert (table.replaces, table.loses_data) == (True, True)
    assert table.details == ("KeySchema!", "AttributeDefinitions")  # ! = forces recreation
    assert (function.replaces, function.loses_data) == (False, False)
    assert version.action == "Add" and not version.loses_data
    review = ChangeSetReview("visual-inspection-prod", "UPDATE", changes, ("+ [X] Allow s3:GetObject on a",))
    lines = review.render().splitlines()
    assert lines[0] == (
        "visual-inspection-prod: update change set: 1 to add, 2 to modify (1 replaced), 0 to remove"
    )
    table_line = (
        "  ~ Modify  Results25575328  AWS::DynamoDB::Table  REPLACE (KeySchema!, AttributeDefinitions)"
    )
    assert table_line in lines
    assert "  + Add     FunctionCurrentVersion4E2B2261new  AWS::Lambda::Version" in lines
    assert lines.index("IAM statement changes: 1") + 1 == lines.index("  + [X] Allow s3:GetObject on a")
    assert lines[-1].startswith("  !! replaces the results table Results25575328")
    removed = ChangeSetReview(
        "s", "UPDATE", tuple(ResourceChange.from_api(c) for c in RECORDED_BUCKET_REMOVED["Changes"]), ()
    )
    assert [c.logical_id for c in removed.data_losing] == ["Overlays30A55718"]  # the new one is empty
    assert "IAM statement changes: none" in removed.render()


def test_table_replacement_is_refused_without_allow_replace_and_nothing_executes(synth: Synth) -> None:
    template = synth.template("prod")
    cfn = RecordedCloudFormation(RECORDED_TABLE_KEY_CHANGE, deployed=template)
    asked: list[ChangeSetReview] = []
    with pytest.raises(DeployRefused) as refused:
        _deploy(cfn, template, confirm=lambda review: asked.append(review) or True)
    message = str(refused.value)
    assert "\n" not in message and "results table Results25575328" in message and "--allow-replace" in message
    assert "execute_change_set" not in cfn.calls and cfn.calls[-1] == "delete_change_set"
    assert asked == []  # refused before anyone is asked

    cfn = RecordedCloudFormation(RECORDED_BUCKET_REMOVED, deployed=template)
    with pytest.raises(DeployRefused, match="results bucket Overlays30A55718"):
        _deploy(cfn, template)
    assert "execute_change_set" not in cfn.calls

    cfn = RecordedCloudFormation(RECORDED_TABLE_KEY_CHANGE, deployed=template)
    result, log = _deploy(cfn, template, allow_replace=True, confirm=lambda review: True)
    assert result.action == "updated" and "execute_change_set" in cfn.calls
    assert "REPLACE (KeySchema!" in log  # still shown to whoever allowed it


def test_confirm_preview_and_termination_protection(synth: Synth) -> None:
    template = synth.template("prod")
    shown: list[ChangeSetReview] = []
    cfn = RecordedCloudFormation(RECORDED_NEW_IMAGE, deployed=template)
    result, log = _deploy(cfn, template, confirm=lambda review: shown.append(review) or False)
    assert result.action == "cancelled" and "execute_change_set" not in cfn.calls
    assert cfn.calls[-1] == "delete_change_set"
    assert [c.logical_id for c in shown[0].changes] == ["Function76856677"]
    assert "  ~ Modify  Function76856677  AWS::Lambda::Function (Code)" in log

    cfn = RecordedCloudFormation(RECORDED_NEW_IMAGE, deployed=template)
    result, _ = _deploy(cfn, template, preview=True, confirm=lambda review: pytest.fail("not asked"))
    assert result.action == "previewed" and "execute_change_set" not in cfn.calls

    # Executed: protection is switched on afterwards (CloudFormation takes it outside change sets).
    cfn = RecordedCloudFormation(RECORDED_NEW_IMAGE, deployed=template, protected=False)
    result, log = _deploy(cfn, template, confirm=lambda review: True, termination_protection=True)
    assert result.action == "updated" and cfn.protected is True
    assert cfn.calls.index("execute_change_set") < cfn.calls.index("update_termination_protection:True")
    # Already on: no call.
    cfn = RecordedCloudFormation(RECORDED_NEW_IMAGE, deployed=template, protected=True)
    _deploy(cfn, template, termination_protection=True)
    assert not [c for c in cfn.calls if c.startswith("update_termination")]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_confirmation_and_refusal_without_a_terminal() -> None:
    review = ChangeSetReview("visual-inspection-dev", "UPDATE", (), ())
    prompt = io.StringIO()
    assert ask_on_terminal(review, stdin=_Tty("y\n"), prompt=prompt) is True
    assert prompt.getvalue() == "Execute this change set on visual-inspection-dev? [y/N] "
    assert ask_on_terminal(review, stdin=_Tty("\n"), prompt=io.StringIO()) is False  # default no
    assert ask_on_terminal(review, stdin=_Tty("yes please\n"), prompt=io.StringIO()) is False
    with pytest.raises(DeployRefused) as refused:
        ask_on_terminal(review, stdin=io.StringIO("y\n"), prompt=io.StringIO())  # piped: nobody there
    assert "stdin is not a terminal" in str(refused.value) and "--yes" in str(refused.value)
    require_reviewer(True, stdin=io.StringIO())  # --yes: CI may deploy without a terminal
    with pytest.raises(DeployRefused):
        require_reviewer(False, stdin=io.StringIO())


def test_cli_without_terminal_or_yes_refuses_in_one_line_before_synth(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # pytest's stdin is not a terminal; nothing is synthesized or called (no AWS endpoint here).
    assert main(["--stage", "dev", "--image-tag", "v1-abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deploy refused: deploy: not executed: stdin is not a terminal") and "\n" not in err


def test_iam_changes_list_statements_added_and_removed(synth: Synth) -> None:
    old = synth.template("dev")
    assert iam_changes(old, old) == ()
    new = copy.deepcopy(old)
    writer = new["Resources"]["CameraWriterPolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    del writer["Condition"]  # a broadening: any user could now post as its own name
    new["Resources"]["CameraWriterPolicy"]["Properties"]["PolicyDocument"]["Statement"][0] = writer
    changes = iam_changes(old, new)
    assert len(changes) == 2
    added, removed = changes
    assert added.startswith(
        "+ [CameraWriterPolicy] Allow execute-api:Invoke on arn:${AWS::Partition}:execute-api:"
    )
    assert added.endswith("/dev/POST/cameras/${aws:username}/images")
    assert removed.startswith("- [CameraWriterPolicy]") and "when ArnLike aws:PrincipalArn=" in removed
    created = iam_changes(None, old)  # first deploy: every statement is new
    assert all(line.startswith("+ ") for line in created)
    assert any("[FunctionRoleDefaultPolicy" in line and "dynamodb:PutItem" in line for line in created)
    assert any("lambda:InvokeFunction to apigateway.amazonaws.com" in line for line in created)
    assert show({"Fn::GetAtt": ["Results", "Arn"]}) == "${Results.Arn}"


def test_change_set_on_local_cloudformation_is_shown_and_cancelled_update_changes_nothing(
    synth: Synth, aws_env: str
) -> None:
    """moto's change sets: the create lists every resource as Add with all IAM statements; an
    update lists what moved; a declined update leaves the deployed template as it was."""
    template, _ = moto_subset(synth.template("full"))
    cfn = boto3.client("cloudformation")
    name = synth.configs["full"].stack_name
    seen: list[ChangeSetReview] = []
    logged: list[str] = []

    def keep(review: ChangeSetReview) -> bool:
        seen.append(review)
        return True

    created = deploy_template(cfn, name, template, poll=0.1, log=logged.append, confirm=keep)
    assert created.action == "created"
    (first,) = seen
    assert first.change_type == "CREATE"
    assert {c.logical_id for c in first.changes} == set(template["Resources"])
    assert {c.action for c in first.changes} == {"Add"}
    assert any("[CameraWriterPolicy] Allow execute-api:Invoke" in line for line in first.iam_changes)
    assert f"{name}: create change set: {len(template['Resources'])} to add" in "\n".join(logged)

    changed = copy.deepcopy(template)
    reader_id = next(
        rid
        for rid, r in changed["Resources"].items()
        if r["Type"] == "AWS::IAM::ManagedPolicy" and rid != "CameraWriterPolicy"
    )
    statement = changed["Resources"][reader_id]["Properties"]["PolicyDocument"]["Statement"][0]
    statement["Action"] = ["execute-api:Invoke", "execute-api:ManageConnections"]
    changed["Resources"]["ExtraTopic"] = {"Type": "AWS::SNS::Topic", "Properties": {}}
    declined = deploy_template(cfn, name, changed, poll=0.1, log=logged.append, confirm=lambda r: False)
    assert declined.action == "cancelled"
    assert len(seen) == 1  # the update was put to the declining confirm, not to `keep`
    review_text = logged[-2]
    assert "update change set: 1 to add, 1 to modify" in review_text
    assert "+ Add     ExtraTopic  AWS::SNS::Topic" in review_text
    assert f"~ Modify  {reader_id}  AWS::IAM::ManagedPolicy" in review_text
    assert f"+ [{reader_id}] Allow execute-api:Invoke, execute-api:ManageConnections" in review_text
    assert f"- [{reader_id}] Allow execute-api:Invoke on" in review_text
    deployed = cfn.get_template(StackName=name)["TemplateBody"]
    deployed = deployed if isinstance(deployed, dict) else json.loads(deployed)
    assert "ExtraTopic" not in deployed["Resources"]
    # The declined change set was deleted (moto keeps listing the executed create one).
    left = cfn.list_change_sets(StackName=name)["Summaries"]
    assert [s.get("ExecutionStatus") for s in left if s.get("ExecutionStatus") != "EXECUTE_COMPLETE"] == []
