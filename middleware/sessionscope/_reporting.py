"""The reporter: the state machine's events fanned out to the observers, and the event log.

The library never configures logging. Its events go where the application's own configuration
sends them (asked at each event, so configuring logging after building the app works): to
``structlog.get_logger("sessionscope")`` when the application configured structlog, else to
the standard ``logging`` logger ``sessionscope`` (the message is the event name followed by its
keys as ``key=value``; the keys are ``extra`` fields too; an event about an exception carries it
as ``exc_info``), which prints nothing below WARNING unless the application turns it on.
One canonical ``db_session.closed`` event per session (its level is the middleware's
``closed_log_level``, debug by default, or none), warnings for late writes, use after close
and suspected leaks, errors for failed commits and cleanups. SQL parameters and connection
URLs are never logged.
"""

from __future__ import annotations

import logging
import math
import traceback
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import structlog
from sqlalchemy.exc import StatementError

from ._request_context import RouteLabels, correlation_id_source, request_id
from .errors import WithheldDatabaseError

if TYPE_CHECKING:
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from ._metrics import DbMetrics
    from ._otel import SessionSpans
    from ._record import LeakSuspect, LeakTracker, PoolObserver, SessionRecord

LOGGER_NAME: Final = "sessionscope"
LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
LEVEL_RECHECK: Final = 1.0
"""Seconds for which the answer "is the closed event's level enabled?" is reused."""

_RECORD_ATTRIBUTES: Final = frozenset({*vars(logging.makeLogRecord({})), "message", "asctime"})
"""Names ``logging`` refuses as ``extra`` keys (a ``LogRecord``'s own attributes)."""


class EventLog:
    """sessionscope's events, sent to structlog or to ``logging`` as the application set up.

    structlog when ``structlog.is_configured()`` (the events are exactly what structlog got
    before ``logging`` was supported), else the standard logger ``sessionscope``. Both are
    asked at each event: the check is a read of structlog's configuration flag, and
    ``Logger.isEnabledFor`` is cached by ``logging``.
    """

    __slots__ = ("_answer", "_answered_until", "_stdlib", "_structlog")

    def __init__(self) -> None:
        self._structlog: Any = structlog.get_logger(LOGGER_NAME)
        self._stdlib = logging.getLogger(LOGGER_NAME)
        self._answer = (0, False)
        self._answered_until = -math.inf

    def is_enabled_for(self, level: int, now: float) -> bool:
        """Whether an event at ``level`` would be logged at ``now`` (a ``perf_counter``).

        Asking structlog costs more than the rest of a session's close: its answer is reused
        for ``LEVEL_RECHECK`` seconds (levels rarely change). ``logging`` caches its own.
        """
        if not structlog.is_configured():
            self._answered_until = -math.inf  # structlog is asked afresh once configured
            return self._stdlib.isEnabledFor(level)
        if now >= self._answered_until or self._answer[0] != level:
            is_enabled_for = getattr(self._structlog, "is_enabled_for", None)
            enabled = True if is_enabled_for is None else bool(is_enabled_for(level))
            self._answer = (level, enabled)
            self._answered_until = now + LEVEL_RECHECK
        return self._answer[1]

    def log(
        self, level: int, event: str, *, exc: BaseException | None = None, **fields: Any
    ) -> None:
        """The event at a numeric ``level``; ``exc``: the exception it is about, if any
        (``exc_info`` of the ``logging`` record; structlog gets the fields only)."""
        if structlog.is_configured():
            self._structlog.log(level, event, **fields)
        elif self._stdlib.isEnabledFor(level):
            self._emit(level, event, fields, exc)

    def info(self, event: str, **fields: Any) -> None:
        """The event at INFO."""
        if structlog.is_configured():
            self._structlog.info(event, **fields)
        elif self._stdlib.isEnabledFor(logging.INFO):
            self._emit(logging.INFO, event, fields, None)

    def warning(self, event: str, **fields: Any) -> None:
        """The event at WARNING."""
        if structlog.is_configured():
            self._structlog.warning(event, **fields)
        elif self._stdlib.isEnabledFor(logging.WARNING):
            self._emit(logging.WARNING, event, fields, None)

    def error(self, event: str, *, exc: BaseException | None = None, **fields: Any) -> None:
        """The event at ERROR; ``exc`` as for :meth:`log`."""
        if structlog.is_configured():
            self._structlog.error(event, **fields)
        elif self._stdlib.isEnabledFor(logging.ERROR):
            self._emit(logging.ERROR, event, fields, exc)

    def _emit(
        self, level: int, event: str, fields: dict[str, Any], exc: BaseException | None
    ) -> None:
        # The message reads on its own (a plain format such as basicConfig's shows only it):
        # the event and its keys. The traceback, when there is an exception, is the record's
        # exc_info, which handlers format below the message (and Sentry or OpenTelemetry
        # handlers take as the exception), so it is not repeated in the message.
        shown = fields if exc is None else {k: v for k, v in fields.items() if k != "traceback"}
        message = _render(event, shown)
        if not _RECORD_ATTRIBUTES.isdisjoint(fields):
            fields = {f"{k}_" if k in _RECORD_ATTRIBUTES else k: v for k, v in fields.items()}
        # stacklevel: the record names the sessionscope code that logged, not this class.
        self._stdlib.log(level, message, exc_info=_exc_info(exc), extra=fields, stacklevel=3)


def _exc_info(
    exc: BaseException | None,
) -> tuple[type[BaseException], BaseException, TracebackType | None] | None:
    if exc is None:
        return None
    if not _involves_database_error(exc):
        return (type(exc), exc, exc.__traceback__)
    safe = {k: v for k, v in error_fields(exc).items() if k not in ("traceback", "error")}
    summary = ", ".join(f"{k}={v}" for k, v in safe.items())
    withheld = WithheldDatabaseError(
        f"{summary} (the message is withheld: it can contain SQL parameters)"
    )
    return (type(exc), withheld, exc.__traceback__)


def _involves_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from or during is a database error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, StatementError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _render(event: str, fields: dict[str, Any]) -> str:
    """``event key=value ...`` on one line, multi-line values (tracebacks) below it."""
    inline = [event]
    below: list[str] = []
    for key, value in fields.items():
        if isinstance(value, str) and "\n" in value.strip():
            below.append(f"{key}:\n{value.rstrip()}")
        elif isinstance(value, str) and (not value or any(c.isspace() for c in value)):
            inline.append(f"{key}={value!r}")
        else:
            inline.append(f"{key}={value}")
    return "\n".join([" ".join(inline), *below])


def event_log() -> EventLog:
    """Where an event of sessionscope goes (see :class:`EventLog`)."""
    return EventLog()


class Reporter:
    """Turns lifecycle events of one middleware's sessions into logs and metrics."""

    def __init__(
        self,
        *,
        name: str,
        closed_level: str | None = "debug",
        metrics: DbMetrics | None = None,
        leaks: LeakTracker | None = None,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.leaks = leaks
        self.pool: PoolObserver | None = None
        self.spans: SessionSpans | None = None
        self.routes = RouteLabels(None)
        """Route labels with their prefixes (the middleware points it at its application)."""
        self._log = EventLog()
        self._closed_level = None if closed_level is None else LEVELS[closed_level]
        self._correlation = correlation_id_source()

    def fields(self, rs: SessionRecord) -> dict[str, Any]:
        """The keys every event about ``rs`` carries."""
        scope = rs.scope
        if rs.request_id is None:
            rs.request_id = request_id(scope, self._correlation)
        return {
            "db": self.name,
            "route": self.routes.label(scope),
            "method": scope.get("method"),
            "request_id": rs.request_id,
        }

    def opened(self, rs: SessionRecord) -> None:
        """A request created its session."""
        if self.spans is not None:
            rs.span = self.spans.start(self.name)
        if self.metrics is not None:
            self.metrics.sessions.opened()
        if self.leaks is not None:
            self.leaks.add(rs)

    def task_opened(self) -> None:
        """A per-task session (``sessionscope.tasks``) was created."""
        if self.metrics is not None:
            self.metrics.sessions.opened()

    def task_closed(self, route: str, outcome: str, seconds: float) -> None:
        """A per-task session closed: counted like a request session of ``route``."""
        metrics = self.metrics
        if metrics is not None:
            metrics.sessions.closed(metrics.route(route).sessions, outcome, seconds, None, None)

    def rolled_back(self, rs: SessionRecord, reason: str) -> None:
        """A transaction of the request was rolled back for ``reason``."""
        if self.metrics is not None:
            self.metrics.rollback(reason)

    def failed(self, rs: SessionRecord, phase: str, exc: BaseException) -> None:
        """``commit``, ``rollback`` or ``close`` raised ``exc``: logged and counted, not raised."""
        if self.metrics is not None:
            self.metrics.error(phase, exc)
        event = "db_session.commit_failed" if phase == "commit" else "db_session.cleanup_failed"
        self._log.error(
            event, exc=exc, phase=phase, status=rs.status, **error_fields(exc), **self.fields(rs)
        )

    def hook_failed(self, rs: SessionRecord, hook: object, exc: BaseException) -> None:
        """An after-commit hook raised: logged and counted; the request stays committed."""
        if self.metrics is not None:
            self.metrics.error("hook", exc)
        fields = self.fields(rs)
        self._log.error(
            "db_session.hook_failed",
            exc=exc,
            hook=getattr(hook, "__qualname__", type(hook).__name__),
            **error_fields(exc),
            **fields,
        )

    def late_write(self, rs: SessionRecord) -> None:
        """Writes made after the commit decision were not committed by the app."""
        self._log.warning(
            "db_session.late_write",
            status=rs.status,
            detail="writes made after the response started were not committed and are "
            "rolled back; commit them explicitly or give that work a session of its own",
            **self.fields(rs),
        )

    def used_after_close(self, db: str, route: str) -> None:
        """A session was used (or first requested) after its request finished."""
        if self.metrics is not None:
            self.metrics.route(route).use_after_close.inc()
        self._log.warning("db_session.use_after_close", db=db, route=route, where=_caller_stack())

    def pool_timeout(self, rs: SessionRecord, exc: PoolTimeoutError) -> None:
        """A pool checkout timed out before the response started: the client gets 503.

        A timeout of the pool itself (not of the admission, counted already) is counted and
        logged here, as having waited the pool's timeout: SQLAlchemy has no public hook at the
        start of a checkout to time it by."""
        if exc is not rs.slot_timeout:
            if self.pool is not None:
                self.pool.record_pool_timeout()
            elif self.metrics is not None:
                self.metrics.pool_timeouts.inc()
        self._log.warning(
            "db_session.pool_timeout", status=503, error_type="TimeoutError", **self.fields(rs)
        )

    def waiting(self, delta: int) -> None:
        """A request started (+1) or stopped (-1) waiting for a pool slot."""
        if self.metrics is not None:
            self.metrics.pool_pending.inc(delta)

    def slot_waited(self, seconds: float) -> None:
        """A request waited ``seconds`` for a pool slot before getting its session."""
        if self.pool is not None:
            self.pool.observe_wait(seconds)

    def slot_timeout(self, seconds: float) -> None:
        """A request waited the whole pool timeout for a slot: counted and logged like a
        checkout timeout, with the pool's state."""
        if self.pool is not None:
            self.pool.record_timeout(seconds)
        elif self.metrics is not None:
            self.metrics.pool_timeouts.inc()

    def leak_suspected(self, suspect: LeakSuspect) -> None:
        """A session crossed the leak threshold (called from the sweep thread)."""
        rs = suspect.entry.rs
        if self.metrics is not None:
            self.metrics.route(suspect.route).leaks_detected.inc()
        session = rs.session
        sync = getattr(session, "sync_session", session)
        self._log.warning(
            "db_session.leak_suspected",
            age_s=round(suspect.age, 3),
            in_transaction=bool(sync is not None and sync.in_transaction()),
            holds_connection=rs.holds_connection(),
            stack=suspect.stack,
            **self.fields(rs),
        )

    def swept(self, over_threshold: int, oldest_age: float) -> None:
        """Gauges after a sweep."""
        if self.metrics is not None:
            self.metrics.leak_suspected.set(over_threshold)
            self.metrics.oldest_age.set(oldest_age)
        if self.pool is not None and self.pool.multiprocess:
            self.pool.refresh()  # no scrape-time reads across processes: resynchronise here

    def closed(self, rs: SessionRecord) -> None:
        """The session is closed: count it (and its commit's duration), resolve a reported
        leak, emit the canonical event."""
        duration = rs.duration
        if rs.span is not None and self.spans is not None:
            self.spans.end(rs.span, rs)
            rs.span = None
        metrics = self.metrics
        route = self.routes.label(rs.scope)
        if metrics is not None:
            metrics.sessions.closed(
                metrics.route(route).sessions,
                rs.outcome or "unused",
                duration,
                rs.statements,
                rs.commit_seconds,
            )
        if self.leaks is not None:
            entry = self.leaks.remove(rs)
            if entry is not None and entry.flagged:
                if metrics is not None:
                    metrics.route(route).leaks_resolved.inc()
                self._log.info(
                    "db_session.leak_resolved", held_s=round(duration, 3), **self.fields(rs)
                )
        level = self._closed_level
        if level is not None and self._log.is_enabled_for(level, rs.closed_at):
            self._log.log(
                level,
                "db_session.closed",
                status=rs.status,
                outcome=rs.outcome,
                reason=rs.reason,
                duration_s=round(duration, 6),
                statements=rs.statements,
                **self.fields(rs),
            )


def error_fields(exc: BaseException) -> dict[str, Any]:
    """An exception as log fields: its type, what can be said of it safely, its traceback.

    Database errors are described by their class, the driver's class and the SQLSTATE only:
    SQLAlchemy's message repeats the SQL and its parameters, and drivers quote offending values
    in theirs (``invalid input syntax for type integer: "..."``); parameters can be personal
    data. Other exceptions keep the first line of their message. The traceback frames are kept.
    """
    fields: dict[str, Any] = {"error_type": type(exc).__name__}
    if isinstance(exc, StatementError):
        orig = exc.orig
        if orig is not None:
            fields["driver_error"] = type(orig).__name__
            sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
            if sqlstate:
                fields["sqlstate"] = str(sqlstate)
    else:
        fields["error"] = str(exc).strip().split("\n", 1)[0][:300]
    fields["traceback"] = "".join(traceback.format_tb(exc.__traceback__))
    return fields


def _caller_stack(limit: int = 8) -> str:
    """The innermost frames outside SQLAlchemy and sessionscope: where the session was used."""
    frames = [
        f
        for f in traceback.extract_stack()
        if "/sqlalchemy/" not in f.filename and "/sessionscope/" not in f.filename
    ]
    return "".join(traceback.format_list(frames[-limit:]))
