"""The service name and metrics namespace every log line and metric of the Lambda carries.

Why a module of its own: the request flow (:mod:`serving.service`) and the storage layer
(:mod:`serving.storage`, a child logger) must log under the same service, and storage cannot import
the service module (the service imports storage). Read once from Powertools' own variables.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger

SERVICE_NAME = os.environ.get("POWERTOOLS_SERVICE_NAME", "visual-inspection")
METRICS_NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "VisualInspection")


def service_logger(*, child: bool = False) -> Logger:
    """The Lambda's Powertools logger (``child=True`` for a module that logs under the handler's)."""
    return Logger(service=SERVICE_NAME, child=child)
