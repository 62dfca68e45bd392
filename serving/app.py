"""AWS Lambda entry point (``serving.app.handler``).

The model and the AWS clients are created once here at import, i.e. in the Lambda init phase
(which also surfaces a bad model or missing configuration as an init error rather than as a
failure of the first request). Routing, the flow and error mapping live in :mod:`serving.service`
(Powertools' REST resolver); Powertools' Logger adds the Lambda context (function name, memory,
request id, cold start) to every line, and API Gateway's request id as correlation id until the
request's own id is known.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths

from serving.service import InferenceService, logger

SERVICE = InferenceService.from_env()


@logger.inject_lambda_context(clear_state=True, correlation_id_path=correlation_paths.API_GATEWAY_REST)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda handler: serve one API Gateway REST proxy event."""
    return SERVICE.handle(event, context)
