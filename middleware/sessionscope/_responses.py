"""The complete responses the middleware sends in place of the application's."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from starlette.types import Message

RETRY_AFTER_SECONDS: Final = 1
_DETAILS: Final = {
    500: "Internal Server Error",
    503: "Service Unavailable: the database connection pool is exhausted; retry shortly.",
}


def error_response(status: int) -> list[Message]:
    """``http.response.start`` and the one body of a JSON error response.

    The body never includes exception text: it is what the client sees.
    """
    body = json.dumps({"detail": _DETAILS[status]}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]
