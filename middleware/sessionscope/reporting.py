"""Structured log events for request sessions (structlog; the library never configures it)."""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING, Any

import structlog

from .request_context import correlation_id_source, request_id, route_template

if TYPE_CHECKING:
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from .lifecycle import RequestSession

LOGGER_NAME = "sessionscope"


class Reporter:
    """Turns what happens to request sessions into log events.

    One ``db_session.closed`` event per session (the canonical line, at ``closed_level``),
    warnings for late writes and use after close, errors for failed commits, rollbacks and
    closes and for pool timeouts.
    """

    def __init__(self, *, name: str, closed_level: str = "debug") -> None:
        self.name = name
        self._log: Any = structlog.get_logger(LOGGER_NAME)
        self._closed_level = closed_level
        self._correlation = correlation_id_source()

    def _fields(self, rs: RequestSession) -> dict[str, Any]:
        scope = rs.scope
        return {
            "db": self.name,
            "route": route_template(scope),
            "method": scope.get("method"),
            "request_id": request_id(scope, self._correlation),
        }

    def opened(self, rs: RequestSession) -> None:
        """A request created its session."""

    def committed(self, rs: RequestSession, seconds: float) -> None:
        """The request transaction committed in ``seconds``."""

    def rolled_back(self, rs: RequestSession, reason: str) -> None:
        """A transaction of the request was rolled back for ``reason``."""

    def failed(self, rs: RequestSession, phase: str, exc: BaseException) -> None:
        """``commit``, ``rollback`` or ``close`` raised ``exc``; it is logged, never raised."""
        event = "db_session.commit_failed" if phase == "commit" else "db_session.cleanup_failed"
        self._log.error(
            event,
            phase=phase,
            error_type=type(exc).__name__,
            status=rs.status,
            exc_info=exc,
            **self._fields(rs),
        )

    def late_write(self, rs: RequestSession) -> None:
        """Writes made after the commit decision were never committed by the app."""
        self._log.warning(
            "db_session.late_write",
            status=rs.status,
            detail="writes made after the response started were not committed and are "
            "rolled back; commit them explicitly or use a session of their own",
            **self._fields(rs),
        )

    def used_after_close(self, rs: RequestSession) -> None:
        """The session was used after its request finished."""
        self._log.warning(
            "db_session.use_after_close",
            where=_caller_stack(),
            **self._fields(rs),
        )

    def pool_timeout(self, rs: RequestSession, exc: PoolTimeoutError) -> None:
        """A pool checkout timed out before the response started."""
        self._log.error("db_session.pool_timeout", error=str(exc), status=503, **self._fields(rs))

    def closed(self, rs: RequestSession) -> None:
        """The session is closed; emit the canonical event."""
        self._log.log(
            _LEVELS[self._closed_level],
            "db_session.closed",
            status=rs.status,
            outcome=rs.outcome,
            reason=rs.reason,
            duration_s=round(rs.duration, 6),
            statements=rs.tally.statements,
            **self._fields(rs),
        )


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _caller_stack(limit: int = 8) -> str:
    """The innermost frames outside SQLAlchemy and sessionscope: where the session was used."""
    frames = [
        f
        for f in traceback.extract_stack()
        if "/sqlalchemy/" not in f.filename and "/sessionscope/" not in f.filename
    ]
    return "".join(traceback.format_list(frames[-limit:]))
