"""Exceptions raised by sessionscope."""

from __future__ import annotations

from sqlalchemy.exc import InvalidRequestError

CONCURRENT_USE_MESSAGE = (
    "the request session was used by two tasks (or threads) at once; a session is not safe "
    "for concurrent use: give each task its own session with "
    "sessionscope.tasks.gather_with_sessions(request, ...) or task_session(request)"
)


class ConfigurationError(ValueError):
    """The middleware or a helper was configured wrongly; the message says how to fix it."""


class MiddlewareOrderWarning(UserWarning):
    """A middleware inside ``DBSessionMiddleware`` changes when the commit decision is made.

    ``GZipMiddleware`` (and other compression middlewares) hold the response start until the
    first body chunk: inside ``DBSessionMiddleware`` the decision waits for that chunk. Add
    them after ``DBSessionMiddleware`` so they wrap it.
    """


class SessionClosedError(RuntimeError):
    """A request session was used after the middleware closed it.

    The request session ends when the application returns from the request. Work that runs
    later (a task spawned with ``asyncio.create_task``, a thread, a callback kept beyond the
    request) must open its own session with :func:`sessionscope.session_scope`.
    """


class SessionNotAvailableError(RuntimeError):
    """A request asked for a session that no ``DBSessionMiddleware`` provides."""


class ReadOnlyRequestError(RuntimeError):
    """A request routed to the read replica tried to write."""


class WithheldDatabaseError(Exception):
    """Stands in for a database error in the ``exc_info`` of sessionscope's ``logging`` records.

    A database error's message repeats the SQL and its parameters, and drivers quote offending
    values in theirs: the record keeps the original exception's type and traceback, with this
    exception, which says only the error's type, the driver's class and the SQLSTATE.
    """


class ConcurrentSessionUseError(InvalidRequestError):
    """The request session was used by two tasks or threads at once.

    A subclass of SQLAlchemy's ``InvalidRequestError``, which SQLAlchemy raises (with less
    to go on) for the same misuse.
    """


def concurrent_use(exc: BaseException) -> ConcurrentSessionUseError | None:
    """A clear error for SQLAlchemy's concurrent-use errors (code ``isce``) in ``exc``."""
    if isinstance(exc, ConcurrentSessionUseError):
        return None
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if isinstance(inner, ConcurrentSessionUseError) or concurrent_use(inner):
                return ConcurrentSessionUseError(CONCURRENT_USE_MESSAGE)
        return None
    if getattr(exc, "code", None) == "isce":
        return ConcurrentSessionUseError(CONCURRENT_USE_MESSAGE)
    return None
