"""The reconciler: the pure decision (which objects are orphans) on key layouts the storage code
itself produces, the handler against moto's S3 + DynamoDB, and the stack wiring (inline code is the
tested module, schedule, least-privilege role) on the synthesized templates."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest

from infra import reconciler
from infra.deploy import show
from infra.stack import RECONCILER_SOURCE, inline_source
from serving.storage import ResultStore, create_resources
from tests.infra.conftest import Synth

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
GRACE = timedelta(hours=24)


def keys(
    request_id: str, attempt: str, camera: str = "line-1:cam.2", prefix: str = "results/"
) -> dict[str, str]:
    """The object keys serving's ResultStore gives an attempt (no AWS call is made)."""
    offline = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    clients = {f"{kind}_client": boto3.client(kind, **offline) for kind in ("s3", "dynamodb")}
    store = ResultStore("t", "b", prefix, store_original=True, **clients)
    return store.object_keys(camera, "2026-11-27T08:00:00Z", request_id, attempt, "image/png")


def test_request_of_reads_the_storage_layout_and_nothing_else() -> None:
    for key in keys("req-1", "a1").values():
        assert reconciler.request_of(key, "results/") == ("line-1:cam.2", "req-1")
    deep = keys("r=2+x", "a1", camera="c", prefix="inspections/line-1/")["overlay"]
    assert reconciler.request_of(deep, "inspections/line-1/") == ("c", "r=2+x")
    for other in (
        "results/readme.txt",
        "results/c/2026/11/27/r1/a/extra",
        "results/c/yyyy/11/27/r/a",
        "x/c/1/2/3/r/a",
    ):
        assert reconciler.request_of(other, "results/") is None


def test_orphans_are_old_unreferenced_objects_of_the_layout_only() -> None:
    live, failed, lost, tomb = keys("live", "a1"), keys("live", "a0"), keys("lost", "a1"), keys("tomb", "a1")
    old, fresh = NOW - GRACE - timedelta(minutes=1), NOW - timedelta(minutes=5)
    objects = [
        *({"Key": k, "LastModified": old} for k in live.values()),  # referenced by the item
        {"Key": failed["overlay"], "LastModified": old},  # an earlier attempt of the same request
        {"Key": lost["overlay"], "LastModified": old},  # no item at all
        {"Key": lost["mask"], "LastModified": fresh},  # no item yet, but maybe being written
        {"Key": tomb["overlay"], "LastModified": old},  # the item is a tombstone (names no object)
        {"Key": "results/readme.txt", "LastModified": old},  # not the layout: never touched
    ]
    referenced = {("line-1:cam.2", "live"): set(live.values()), ("line-1:cam.2", "tomb"): set()}
    assert reconciler.orphans(objects, referenced, "results/", NOW, GRACE) == [
        failed["overlay"],
        lost["overlay"],
        tomb["overlay"],
    ]
    assert reconciler.orphans(objects, referenced, "results/", NOW, timedelta(days=30)) == []


def test_handler_deletes_orphans_on_local_s3_and_counts_them(
    aws_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    create_resources("results-table", "results-bucket")
    s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
    live, failed, lost = keys("live", "a1"), keys("live", "a0"), keys("lost", "a1")
    for key in [
        *live.values(),
        failed["overlay"],
        lost["overlay"],
        lost["mask"],
        "results/notes.txt",
        "other/x",
    ]:
        s3.put_object(Bucket="results-bucket", Key=key, Body=b"x")
    item = {
        "camera_id": {"S": "line-1:cam.2"},
        "request_id": {"S": "live"},
        "captured_at": {"S": "2026-11-27"},
    }
    item.update({f"{name}_key": {"S": key} for name, key in live.items()})
    ddb.put_item(TableName="results-table", Item=item)
    env = {"RESULTS_TABLE": "results-table", "RESULTS_BUCKET": "results-bucket", "RESULTS_PREFIX": "results/"}
    for name, value in {**env, "DEPLOY_STAGE": "dev", "GRACE_HOURS": "1"}.items():
        monkeypatch.setenv(name, value)

    # Everything was just written: inside the grace period nothing is an orphan yet.
    assert reconciler.handler({}, None) == {"ObjectsScanned": 7, "OrphansRemoved": 0, "DeleteErrors": 0}
    monkeypatch.setenv("GRACE_HOURS", "0")
    capsys.readouterr()
    assert reconciler.handler({}, None) == {"ObjectsScanned": 7, "OrphansRemoved": 3, "DeleteErrors": 0}
    left = {o["Key"] for o in s3.list_objects_v2(Bucket="results-bucket")["Contents"]}
    assert left == {*live.values(), "results/notes.txt", "other/x"}
    (line,) = capsys.readouterr().out.splitlines()  # one Embedded Metric Format line per run
    emf = json.loads(line)
    assert emf["OrphansRemoved"] == 3 and emf["Stage"] == "dev"
    assert {m["Name"] for m in emf["_aws"]["CloudWatchMetrics"][0]["Metrics"]} == {
        "ObjectsScanned",
        "OrphansRemoved",
        "DeleteErrors",
    }


def _resources(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {rid: r for rid, r in template["Resources"].items() if r["Type"] == kind}


@pytest.mark.parametrize("label", ["dev", "prod", "full"])
def test_stack_runs_the_tested_module_on_a_schedule_with_least_privilege(synth: Synth, label: str) -> None:
    template, config = synth.template(label), synth.configs[label]
    inline = {
        rid: r
        for rid, r in _resources(template, "AWS::Lambda::Function").items()
        if "ZipFile" in json.dumps(r)
    }
    if not config.reconcile_grace_hours:
        assert inline == {} and _resources(template, "AWS::Events::Rule") == {}
        return
    ((function_id, function),) = inline.items()
    props = function["Properties"]
    code = props["Code"]["ZipFile"]
    assert code == inline_source()
    # Only documentation was dropped from the module the tests above exercise.
    stripped = ast.parse(RECONCILER_SOURCE.read_text())
    assert ast.dump(ast.parse(code)) != ast.dump(stripped)  # docstrings are gone ...
    assert [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)] == [
        n.name for n in stripped.body if isinstance(n, ast.FunctionDef)
    ]  # ... every function is there
    assert len(code) <= 4096 and props["Handler"] == "index.handler" and props["Runtime"] == "python3.14"
    assert props["ReservedConcurrentExecutions"] == 1 and props["Timeout"] == 900
    env = props["Environment"]["Variables"]
    assert (
        env["GRACE_HOURS"] == f"{config.reconcile_grace_hours:g}"
        and env["RESULTS_PREFIX"] == config.results_prefix
    )
    ((_, rule),) = _resources(template, "AWS::Events::Rule").items()
    amount, unit = rule["Properties"]["ScheduleExpression"].removeprefix("rate(").rstrip(")").split()
    hours = {"hour": 1, "hours": 1, "day": 24, "days": 24}[unit] * int(amount)  # CDK writes 24 h as 1 day
    assert hours == config.reconcile_every_hours
    assert rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [function_id, "Arn"]}
    role_id = props["Role"]["Fn::GetAtt"][0]
    (policy,) = [
        p
        for p in _resources(template, "AWS::IAM::Policy").values()
        if {"Ref": role_id} in p["Properties"]["Roles"]
    ]
    granted = {s["Sid"]: s for s in policy["Properties"]["PolicyDocument"]["Statement"]}
    assert {sid: s["Action"] for sid, s in granted.items()} == {
        "ReadItems": "dynamodb:BatchGetItem",
        "ListOwnPrefix": "s3:ListBucket",
        "DeleteOrphans": "s3:DeleteObject",
        "OwnLogGroup": ["logs:CreateLogStream", "logs:PutLogEvents"],
    }
    (bucket_id,) = _resources(template, "AWS::S3::Bucket")
    assert show(granted["DeleteOrphans"]["Resource"]) == f"${{{bucket_id}.Arn}}/{config.results_prefix}*"
    assert (
        show(granted["ReadItems"]["Resource"])
        == f"${{{next(iter(_resources(template, 'AWS::DynamoDB::Table')))}.Arn}}"
    )
    assert granted["ListOwnPrefix"]["Condition"] == {
        "StringLike": {"s3:prefix": [f"{config.results_prefix}*"]}
    }
