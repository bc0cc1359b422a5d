"""What a request is called in logs and metrics: its route template and its request id."""

from __future__ import annotations

import importlib
import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final

UNMATCHED: Final = "__unmatched__"
"""The route label of requests no route matched (404s, scans)."""

_REQUEST_ID_HEADER: Final = b"x-request-id"
_VALID_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def route_template(scope: dict[str, Any] | Any) -> str:
    """The matched route's path template (``/items/{item_id}``), never the raw path."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


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
