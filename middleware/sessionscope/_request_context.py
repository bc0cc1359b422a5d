"""What a request is called in logs and metrics: its route template and its request id."""

from __future__ import annotations

import importlib
import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final

from starlette.routing import Mount, compile_path

UNMATCHED: Final = "__unmatched__"
"""The route label of requests no route matched (404s, scans)."""

_REQUEST_ID_HEADER: Final = b"x-request-id"
_VALID_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def route_template(scope: dict[str, Any] | Any) -> str:
    """The matched route's path template (``/items/{item_id}``), never the raw path."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


class RouteLabels:
    """The full template of a request's route: router prefixes and mount paths included.

    ``scope["route"]`` is the matched route object, whose ``path`` lacks the prefix of
    ``include_router(router, prefix="/a")`` (FastAPI keeps the router's own route objects)
    and the path of ``app.mount("/v2", sub)``. The templates a route object is reachable under
    are found once, by walking the application below the middleware; a route reachable under
    several (included twice, mounted twice) is told apart by matching the request's path.
    """

    def __init__(self, app: object) -> None:
        self.app = app
        self.known: dict[int, tuple[object, tuple[tuple[str, re.Pattern[str]], ...]]] = {}
        """``id(route)`` -> (the route, its full templates and their regexes)."""

    def label(self, scope: dict[str, Any] | Any) -> str:
        """``scope``'s route template with its prefixes; ``__unmatched__`` without a route."""
        route = scope.get("route")
        entry = self.known.get(id(route))
        if entry is None or entry[0] is not route:
            if route is None:
                return UNMATCHED
            entry = self._learn(route)
        templates = entry[1]
        if len(templates) == 1:
            return templates[0][0]
        if not templates:
            return route_template(scope)
        path = _routed_path(scope)
        for template, regex in templates:
            if regex.match(path):
                return template
        return templates[0][0]

    def _learn(self, route: object) -> tuple[object, tuple[tuple[str, re.Pattern[str]], ...]]:
        found = _templates(self.app).get(id(route), [])
        templates = tuple(dict.fromkeys(found))
        entry = (route, tuple((t, compile_path(t)[0]) for t in templates))
        if len(self.known) < _MAX_KNOWN_ROUTES:
            self.known[id(route)] = entry
        return entry


_MAX_KNOWN_ROUTES: Final = 10_000


def _templates(app: object) -> dict[int, list[str]]:
    """``id(route)`` -> every full template the route is served under in ``app``."""
    found: dict[int, list[str]] = {}
    pending: list[tuple[object, str]] = [(app, "")]
    seen: set[tuple[int, str]] = set()
    while pending and len(seen) < 4096:
        node, prefix = pending.pop()
        if node is None or (id(node), prefix) in seen:
            continue
        seen.add((id(node), prefix))
        routes = getattr(node, "routes", None)
        if routes is None:  # a middleware: look further in
            pending.append((getattr(node, "app", None), prefix))
            continue
        for entry in _route_entries(routes):
            original = getattr(entry, "original_route", entry)
            path = getattr(entry, "path", None)
            if isinstance(original, Mount) and isinstance(path, str):
                pending.append((original.app, prefix + path))
            elif hasattr(original, "routes"):  # Host and the like: no path of their own
                pending.append((original, prefix))
            elif isinstance(path, str) and path:
                found.setdefault(id(original), []).append(prefix + path)
    return found


def _route_entries(routes: Any) -> Any:
    """FastAPI's effective routes (with their include_router prefixes) when it offers them,
    else the routes as they are."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # no FastAPI, or one that copies included routes with their prefix
        return routes
    return iter_route_contexts(routes)


def _routed_path(scope: Any) -> str:
    """The request path below the application's own root path."""
    path: str = scope.get("path", "")
    base: str = scope.get("app_root_path", scope.get("root_path", ""))
    return path[len(base) :] if base and path.startswith(base) else path


def correlation_id_source() -> Callable[[], str | None]:
    """Read asgi-correlation-id's ContextVar when that package is installed."""
    try:
        module = importlib.import_module("asgi_correlation_id.context")
    except ImportError:  # optional integration
        return _none
    var: ContextVar[str | None] = module.correlation_id
    return lambda: var.get(None)


def _none() -> str | None:
    return None


def request_id(scope: Any, from_correlation: Callable[[], str | None]) -> str:
    """The request id for log events.

    asgi-correlation-id's id when that middleware runs outside this one; else the
    ``X-Request-ID`` header; else a new random id. An id is used only when it is 1-128
    characters of ``[A-Za-z0-9._:-]``: anything else could forge or break log lines and is
    never logged (asgi-correlation-id with ``validator=None`` passes any header on).
    """
    known = from_correlation()
    if known and _VALID_REQUEST_ID.fullmatch(known):
        return known
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_HEADER:
            text: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex
