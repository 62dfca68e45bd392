"""AWS Lambda entry point (``serving.app.handler``).

The model and the AWS clients are created once here at import, i.e. in the Lambda init phase
(which also surfaces a bad model or missing configuration as an init error rather than as a
failure of the first request). The flow itself lives in :mod:`serving.service`; Powertools'
Logger adds the Lambda context (function name, memory, request id, cold start) to every line.
"""

from __future__ import annotations

from typing import Any

from serving.service import InferenceService, logger

SERVICE = InferenceService.from_env()


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda handler: serve one API Gateway / function URL event."""
    return SERVICE.handle(event, context)
