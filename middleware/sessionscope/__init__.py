"""sessionscope: request-scoped SQLAlchemy sessions for Starlette and FastAPI.

``DBSessionMiddleware`` gives every HTTP request its own session, commits or rolls back by the
response status before the client sees that status, and always closes it.
``session_scope`` does the same for work outside requests.
"""

from ._policy import commit_below_400
from ._scope import session_scope
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


def __getattr__(name: str) -> str:
    """``sessionscope.__version__``: the installed distribution's version, read from its
    metadata when asked (``pyproject.toml`` is the one place it is written)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sessionscope")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"
