"""Exceptions raised by sessionscope."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """The middleware or a helper was configured wrongly; the message says how to fix it."""


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
