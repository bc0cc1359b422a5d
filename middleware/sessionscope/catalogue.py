"""The metric catalogue: every metric sessionscope exports, in one place.

The library creates its metrics from this table, and the dashboard and alert generators read it,
so a name cannot drift between what is exported and what is charted. Names are shown without
the namespace (default ``db``): ``sessions_open`` is exported as ``db_sessions_open``. Every
metric also has the label ``db``: the middleware's ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["counter", "gauge", "histogram"]

DEFAULT_NAMESPACE: Final = "db"
DB_LABEL: Final = "db"

DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
"""Session duration and connection use: long enough to see leak tails."""
WAIT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
"""Pool wait: reaches SQLAlchemy's default ``pool_timeout`` (30 s) and beyond."""
COMMIT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""Commit duration: OpenTelemetry's advisory buckets for database operations."""
CONNECT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""New-connection time (TLS and cloud databases included)."""
STATEMENT_BUCKETS: Final = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
"""Statements per session; ``le="0"`` counts sessions that ran none."""

ERROR_TYPES: Final = (
    "IntegrityError",
    "OperationalError",
    "InterfaceError",
    "ProgrammingError",
    "DataError",
    "InternalError",
    "NotSupportedError",
    "DBAPIError",
    "TimeoutError",
    "PendingRollbackError",
    "InvalidRequestError",
    "CancelledError",
    "other",
)
"""The closed list of ``error_type`` label values: an exception's class name, else ``other``."""


@dataclass(frozen=True, slots=True)
class Metric:
    """One exported metric family."""

    name: str
    """Exported name without the namespace; counters end in ``_total``."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    """Labels besides ``db``."""
    unit: str = "short"
    """The Grafana unit of its values (``s``, ``short``, ``percentunit`` ...)."""
    buckets: tuple[float, ...] = ()
    multiprocess_mode: str = ""
    """For gauges under ``PROMETHEUS_MULTIPROC_DIR``: how worker values combine."""

    def exported(self, namespace: str = DEFAULT_NAMESPACE) -> str:
        """The name Prometheus sees (counters keep their ``_total``)."""
        return f"{namespace}_{self.name}"

    @property
    def all_labels(self) -> tuple[str, ...]:
        """Every label of the family, ``db`` first."""
        return (DB_LABEL, *self.labels)


def _c(name: str, help: str, *labels: str) -> Metric:
    return Metric(name, "counter", help, labels)


def _g(name: str, help: str, *labels: str, unit: str = "short", mode: str = "livesum") -> Metric:
    return Metric(name, "gauge", help, labels, unit=unit, multiprocess_mode=mode)


def _h(name: str, help: str, buckets: tuple[float, ...], *labels: str, unit: str = "s") -> Metric:
    return Metric(name, "histogram", help, labels, unit=unit, buckets=buckets)


SESSIONS_OPEN: Final = _g("sessions_open", "Request sessions currently open.")
SESSIONS_CLOSED: Final = _c(
    "sessions_closed_total",
    "Request sessions closed, by route template and outcome (commit, rollback, unused).",
    "route",
    "outcome",
)
SESSION_DURATION: Final = _h(
    "session_duration_seconds",
    "Time from a request session's creation to its close, by outcome.",
    DURATION_BUCKETS,
    "outcome",
)
SESSION_HELD: Final = _c(
    "session_held_seconds_total",
    "Seconds request sessions were held, by route; its rate is the number of sessions a route "
    "holds at once on average.",
    "route",
)
SESSION_ROLLBACKS: Final = _c(
    "session_rollbacks_total",
    "Rollbacks by reason (status_4xx, status_5xx, exception, cancelled, commit_error, "
    "late_write, disconnected, pool_timeout).",
    "reason",
)
SESSION_COMMIT_DURATION: Final = _h(
    "session_commit_duration_seconds",
    "Time spent committing request transactions (the final flush included).",
    COMMIT_BUCKETS,
)
SESSION_ERRORS: Final = _c(
    "session_errors_total",
    "Errors by phase: commit, rollback or close of a request session, or hook (an "
    "after-commit hook raised).",
    "phase",
    "error_type",
)
SESSION_STATEMENTS: Final = _h(
    "session_statements",
    "SQL statements run per request session.",
    STATEMENT_BUCKETS,
    unit="short",
)
STATEMENTS: Final = _c(
    "statements_total", "SQL statements run by request sessions, by route.", "route"
)

SESSIONS_LEAK_SUSPECTED: Final = _g(
    "sessions_leak_suspected", "Open request sessions older than the leak threshold."
)
SESSION_OLDEST_AGE: Final = _g(
    "session_oldest_age_seconds",
    "Age of the oldest open request session.",
    unit="s",
    mode="livemax",
)
SESSION_LEAKS_DETECTED: Final = _c(
    "session_leaks_detected_total", "Sessions that crossed the leak threshold, by route.", "route"
)
SESSION_LEAKS_RESOLVED: Final = _c(
    "session_leaks_resolved_total",
    "Sessions reported as leaks that were closed later, by route.",
    "route",
)
SESSION_USE_AFTER_CLOSE: Final = _c(
    "session_use_after_close_total",
    "Attempts to use a request session after its request finished, by route.",
    "route",
)
SESSIONS_GC_UNCLOSED: Final = _c(
    "sessions_gc_unclosed_total",
    "Sessions from session_scope() garbage-collected without being closed.",
)
LEAK_THRESHOLD: Final = _g(
    "leak_threshold_seconds",
    "Age after which an open session is reported as a suspected leak (0: detection off).",
    unit="s",
    mode="livemax",
)

POOL_CONNECTIONS: Final = _g(
    "pool_connections", "Pooled connections by state (idle, used).", "state"
)
POOL_CONNECTIONS_MAX: Final = _g(
    "pool_connections_max", "Most connections the pool may open (pool_size + max_overflow)."
)
POOL_PENDING: Final = _g(
    "pool_pending_requests", "Checkouts currently waiting for a pooled connection."
)
POOL_TIMEOUT: Final = _g(
    "pool_timeout_seconds",
    "How long a checkout waits before failing (the pool's timeout).",
    unit="s",
    mode="livemax",
)
POOL_WAIT: Final = _h(
    "pool_wait_seconds",
    "Time spent waiting for a pooled connection (successful and timed-out checkouts).",
    WAIT_BUCKETS,
)
POOL_USE: Final = _h("pool_use_seconds", "Time a connection stayed checked out.", DURATION_BUCKETS)
POOL_CONNECT: Final = _h(
    "pool_connect_seconds", "Time to open a new database connection.", CONNECT_BUCKETS
)
POOL_TIMEOUTS: Final = _c("pool_timeouts_total", "Checkouts that timed out waiting for the pool.")
POOL_CREATED: Final = _c("pool_connections_created_total", "Database connections opened.")
POOL_CLOSED: Final = _c("pool_connections_closed_total", "Database connections closed.")
POOL_INVALIDATED: Final = _c(
    "pool_connections_invalidated_total",
    "Connections invalidated (hard: closed at once; soft: replaced at next checkout).",
    "kind",
)

SESSION_METRICS: Final = (
    SESSIONS_OPEN,
    SESSIONS_CLOSED,
    SESSION_DURATION,
    SESSION_HELD,
    SESSION_ROLLBACKS,
    SESSION_COMMIT_DURATION,
    SESSION_ERRORS,
    SESSION_STATEMENTS,
    STATEMENTS,
)
LEAK_METRICS: Final = (
    SESSIONS_LEAK_SUSPECTED,
    SESSION_OLDEST_AGE,
    SESSION_LEAKS_DETECTED,
    SESSION_LEAKS_RESOLVED,
    SESSION_USE_AFTER_CLOSE,
    SESSIONS_GC_UNCLOSED,
    LEAK_THRESHOLD,
)
POOL_METRICS: Final = (
    POOL_CONNECTIONS,
    POOL_CONNECTIONS_MAX,
    POOL_PENDING,
    POOL_TIMEOUT,
    POOL_WAIT,
    POOL_USE,
    POOL_CONNECT,
    POOL_TIMEOUTS,
    POOL_CREATED,
    POOL_CLOSED,
    POOL_INVALIDATED,
)
CATALOGUE: Final = SESSION_METRICS + LEAK_METRICS + POOL_METRICS
"""Every metric sessionscope exports."""


@dataclass(frozen=True, slots=True)
class Event:
    """One log event sessionscope emits."""

    name: str
    level: Literal["debug", "info", "warning", "error"]
    """The level it is emitted at (``db_session.closed``: ``closed_log_level``)."""
    help: str
    fields: tuple[str, ...]
    """Its keys besides ``event`` and ``level``."""
    optional: tuple[tuple[str, str], ...] = ()
    """Keys of ``fields`` that only some of its events carry, each with when it does."""

    def when_present(self, key: str) -> str | None:
        """When ``key`` is there, if only sometimes; ``None`` for a key every event carries."""
        return dict(self.optional).get(key)


_REQUEST_FIELDS: Final = ("db", "route", "method", "request_id")
_ERROR_FIELDS: Final = ("error_type", "driver_error", "sqlstate", "error", "traceback")
_ERROR_OPTIONAL: Final = (
    ("driver_error", "database errors only"),
    ("sqlstate", "database errors whose driver gives one"),
    ("error", "other errors only: a database error's message is never logged"),
)

EVENTS: Final = (
    Event(
        "db_session.closed",
        "debug",
        "One per request session, when it closes: how it ended and what it did.",
        (*_REQUEST_FIELDS, "status", "outcome", "reason", "duration_s", "statements"),
    ),
    Event(
        "db_session.commit_failed",
        "error",
        "The commit at response start failed: rolled back, the client gets a complete 500.",
        (*_REQUEST_FIELDS, "phase", "status", *_ERROR_FIELDS),
        _ERROR_OPTIONAL,
    ),
    Event(
        "db_session.cleanup_failed",
        "error",
        "A rollback or close failed; the connection is invalidated so it cannot go back to the "
        "pool in a transaction.",
        (*_REQUEST_FIELDS, "phase", "status", *_ERROR_FIELDS),
        _ERROR_OPTIONAL,
    ),
    Event(
        "db_session.hook_failed",
        "error",
        "An after-commit hook raised; the request stays committed.",
        (*_REQUEST_FIELDS, "hook", *_ERROR_FIELDS),
        _ERROR_OPTIONAL,
    ),
    Event(
        "db_session.late_write",
        "warning",
        "Writes made after the response started were not committed by the application and "
        "are rolled back.",
        (*_REQUEST_FIELDS, "status", "detail"),
    ),
    Event(
        "db_session.use_after_close",
        "warning",
        "A request session was used, or first asked for, after its request finished.",
        ("db", "route", "where"),
    ),
    Event(
        "db_session.pool_timeout",
        "warning",
        "No pooled connection within the pool's timeout before the response started: the "
        "client gets 503 with Retry-After.",
        (*_REQUEST_FIELDS, "status", "error_type"),
    ),
    Event(
        "db_session.leak_suspected",
        "warning",
        "An open request session crossed the leak threshold (reported once per session).",
        (*_REQUEST_FIELDS, "age_s", "in_transaction", "holds_connection", "stack"),
    ),
    Event(
        "db_session.leak_resolved",
        "info",
        "A session reported as a suspected leak was closed.",
        (*_REQUEST_FIELDS, "held_s"),
    ),
    Event(
        "db_session.gc_unclosed",
        "warning",
        "A session_scope() session was garbage-collected without being closed.",
        ("db", "opened_at", "detail"),
    ),
    Event(
        "db_session.sweep_failed",
        "error",
        "The leak sweep raised; it keeps running.",
        _ERROR_FIELDS,
        _ERROR_OPTIONAL,
    ),
    Event(
        "db_pool.timeout",
        "error",
        "A pool checkout timed out, with the pool's state at that moment.",
        ("db", "pool_size", "checked_out", "overflow", "pending", "waited_s", "timeout_s"),
    ),
    Event(
        "db_lifespan.dispose_failed",
        "error",
        "An engine could not be disposed at shutdown; the other engines still are.",
        ("database", "error_type", "error"),
    ),
)
"""Every log event sessionscope emits."""
