"""The HTTP routes of the API: one list shared by the handler, the local server and infra/ (CDK).

``{name}`` matches one path segment, as in API Gateway.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

SCORE_ROUTE = ("POST", "/cameras/{camera_id}/images")
RESULT_ROUTE = ("GET", "/cameras/{camera_id}/results/{request_id}")
RESULTS_ROUTE = ("GET", "/cameras/{camera_id}/results")
ROUTES: tuple[tuple[str, str], ...] = (SCORE_ROUTE, RESULT_ROUTE, RESULTS_ROUTE)


def _route_regex(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(f"^{pattern}$")


_COMPILED_ROUTES = [(method, template, _route_regex(template)) for method, template in ROUTES]


def match_route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """``(routeKey, pathParameters)`` for a configured route, else ``None`` (API Gateway 404)."""
    for route_method, template, regex in _COMPILED_ROUTES:
        found = regex.match(path)
        if found and route_method in (method, "ANY"):
            return f"{route_method} {template}", {k: unquote(v) for k, v in found.groupdict().items()}
    return None


def event_method_and_path(event: dict[str, Any]) -> tuple[str, str]:
    """HTTP method and raw path of a REST v1, HTTP API v2 or function URL event."""
    http = (event.get("requestContext") or {}).get("http") or {}
    method = str(event.get("httpMethod") or http.get("method") or "POST").upper()
    path = str(event.get("rawPath") or event.get("path") or http.get("path") or "")
    return method, path
