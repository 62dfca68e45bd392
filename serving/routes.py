"""The HTTP routes of the API: the one table read by the handler, the local server and infra/ (CDK).

Templates are written as API Gateway writes resources (``{name}`` matches one path segment);
:func:`resolver_rule` turns them into Powertools' ``<name>`` rules, so the handler's route decorators
and the stack's resources cannot drift apart.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

SCORE_ROUTE = ("POST", "/cameras/{camera_id}/images")
RESULT_ROUTE = ("GET", "/cameras/{camera_id}/results/{request_id}")
RESULTS_ROUTE = ("GET", "/cameras/{camera_id}/results")
ROUTES: tuple[tuple[str, str], ...] = (SCORE_ROUTE, RESULT_ROUTE, RESULTS_ROUTE)

_PARAMETER = re.compile(r"\{(\w+)\}")
# A REST API behind a custom domain puts the base path mapping in front of the resource path
# (``/v1/cameras/...``); every route starts with one of these segments, so anything before the
# first of them is such a prefix. (On the execute-api endpoint ``path`` carries no stage.)
_ROOTS = sorted({template.split("/")[1] for _, template in ROUTES})
BASE_PATH_PREFIX = re.compile(r"^/.*?(?=/(?:" + "|".join(map(re.escape, _ROOTS)) + r")/)")


def resolver_rule(template: str) -> str:
    """The Powertools rule of an API Gateway resource template: ``{camera_id}`` → ``<camera_id>``."""
    return _PARAMETER.sub(r"<\1>", template)


def _route_regex(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(f"^{pattern}$")


_COMPILED_ROUTES = [(method, template, _route_regex(template)) for method, template in ROUTES]


def strip_base_path(path: str) -> str:
    """``path`` without a custom domain's base path mapping (see :data:`BASE_PATH_PREFIX`)."""
    return BASE_PATH_PREFIX.sub("", path, count=1)


def match_route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """``(resource template, decoded pathParameters)`` as API Gateway REST matches them, else ``None``.

    ``path`` is the request path as sent (percent-encoded); parameters are decoded, as API Gateway
    decodes them.
    """
    for route_method, template, regex in _COMPILED_ROUTES:
        found = regex.match(path)
        if found and route_method == method:
            return template, {k: unquote(v) for k, v in found.groupdict().items()}
    return None


def allowed_methods(path: str) -> list[str]:
    """The methods some route serves at ``path`` (empty: no such resource), for 405 vs 404."""
    path = strip_base_path(path)
    return sorted({method for method, _, regex in _COMPILED_ROUTES if regex.match(path)})
