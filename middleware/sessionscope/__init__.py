"""sessionscope: request-scoped SQLAlchemy sessions for Starlette and FastAPI.

``DBSessionMiddleware`` gives every HTTP request its own session, commits or rolls back by the
response status before the client sees that status, and always closes it.
``session_scope`` does the same for work outside requests.
"""

from .errors import (
    ConcurrentSessionUseError,
    ConfigurationError,
    MiddlewareOrderWarning,
    ReadOnlyRequestError,
    SessionClosedError,
    SessionNotAvailableError,
)
from .hooks import on_commit
from .middleware import DBSessionMiddleware
from .policy import commit_below_400
from .scope import session_scope

__all__ = [
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DBSessionMiddleware",
    "MiddlewareOrderWarning",
    "ReadOnlyRequestError",
    "SessionClosedError",
    "SessionNotAvailableError",
    "commit_below_400",
    "on_commit",
    "session_scope",
]
