"""Cut a synthesized template down to what moto's CloudFormation can create (test-only).

moto implements CloudFormation for many resource types but not all (it warns and then fails on a
reference to a resource it skipped). The deploy test keeps every resource whose type moto
supports and whose references resolve, and drops the rest *with everything that refers to them*,
so the remaining template is still self-consistent. The dropped types are listed here, in one
place, so the report of what could not be exercised locally is exact.
"""

from __future__ import annotations

import copy
from typing import Any

# Types moto 5.2.5 cannot create through CloudFormation (or cannot create from a synthesized
# reference to another resource); found by deploying the full template to moto's server.
MOTO_UNSUPPORTED_TYPES = frozenset(
    {
        "AWS::S3::BucketPolicy",
        "AWS::Lambda::Version",
        "AWS::Lambda::Alias",
        "AWS::Lambda::Permission",
        "AWS::ApiGateway::Deployment",
        "AWS::ApiGateway::Stage",
        "AWS::CloudWatch::Alarm",
        "AWS::SNS::Subscription",
        "AWS::SNS::TopicPolicy",
        "AWS::ApiGateway::Account",
    }
)


def references(node: Any) -> set[str]:
    """Logical ids a template fragment refers to (Ref, Fn::GetAtt, Fn::Sub ${...}, DependsOn)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0] if isinstance(value, list) else str(value).split(".")[0])
            elif key == "DependsOn":
                found.update([value] if isinstance(value, str) else value)
            else:
                found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def moto_subset(
    template: dict[str, Any], unsupported: frozenset[str] = MOTO_UNSUPPORTED_TYPES
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(template without unsupported resources and their dependants, {dropped id: type})``."""
    out = copy.deepcopy(template)
    resources: dict[str, Any] = out["Resources"]
    dropped = {rid: r["Type"] for rid, r in resources.items() if r["Type"] in unsupported}
    while True:
        more = {
            rid: r["Type"]
            for rid, r in resources.items()
            if rid not in dropped and references(r) & set(dropped)
        }
        if not more:
            break
        dropped.update(more)
    for rid in dropped:
        del resources[rid]
    out["Outputs"] = {k: v for k, v in out.get("Outputs", {}).items() if not references(v) & set(dropped)}
    return out, dropped
