"""Who called, and which camera ids that caller may write: one rule for the handler and the stack.

Why a naming rule and not a lookup: a camera is an IAM user created by the provisioning command at
the path :data:`CAMERA_PATH` with its camera id as the user name. API Gateway (IAM auth) puts the
caller's ARN in the REST v1 request context, so the handler can bind the ARN to the camera id in the
URL without an extra call, and the stack's writer policy grants ``POST`` on
``cameras/${aws:username}/images`` to the same users. Two independent checks, one convention.

Principals that are not cameras (readers, operators, the release role) are not bound here: IAM
decides what they may call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

CAMERA_PATH = "/visual-inspection/cameras/"  # IAM path of every camera user
_CAMERA_ARN = re.compile(
    r"^arn:aws[a-z-]*:iam::(?P<account>\d{12}):user"
    + re.escape(CAMERA_PATH)
    + r"(?P<camera>[A-Za-z0-9._-]{1,64})$"  # IAM user names, within the API's camera id rule
)


@dataclass(frozen=True)
class Caller:
    """The caller as API Gateway saw it: ARN (or ``anonymous``), access key, source IP, camera bound."""

    arn: str
    access_key: str = ""
    source_ip: str = ""
    camera_id: str | None = None  # set when the caller is a camera principal

    def may_write(self, camera_id: str) -> bool:
        """A camera writes only as itself; any other principal is left to IAM."""
        return self.camera_id is None or self.camera_id == camera_id

    def may_read(self) -> bool:
        """Cameras upload; they do not list or read results (the reader policy is separate)."""
        return self.camera_id is None

    def log_fields(self) -> dict[str, str]:
        return {"caller": self.arn, "caller_access_key": self.access_key, "source_ip": self.source_ip}


def camera_arn(account: str, camera_id: str, partition: str = "aws") -> str:
    """The ARN the provisioning command gives a camera's IAM user."""
    return f"arn:{partition}:iam::{account}:user{CAMERA_PATH}{camera_id}"


def caller_from_event(event: dict[str, Any]) -> Caller:
    """The caller of a REST v1 (``requestContext.identity``) or HTTP API v2 (``authorizer.iam``) event."""
    context = event.get("requestContext") or {}
    identity = context.get("identity") or {}
    iam = (context.get("authorizer") or {}).get("iam") or {}
    arn = str(identity.get("userArn") or iam.get("userArn") or "") or "anonymous"
    access_key = str(identity.get("accessKey") or iam.get("accessKey") or "")
    source_ip = str(identity.get("sourceIp") or (context.get("http") or {}).get("sourceIp") or "")
    found = _CAMERA_ARN.match(arn)
    camera = found["camera"] if found else None
    return Caller(arn=arn, access_key=access_key, source_ip=source_ip, camera_id=camera)
