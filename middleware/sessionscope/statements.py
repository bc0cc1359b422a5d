"""Counting the statements a request runs, through one engine listener and a ContextVar.

The listener is installed once per engine. Each request that passes through a
``DBSessionMiddleware`` makes its :class:`StatementTally` current; sync endpoints (run in the
threadpool with a copy of the context) and async drivers (greenlets that copy the context)
see the same tally object, so their increments land where the middleware reads them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from threading import get_ident
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool

from .errors import CONCURRENT_USE_MESSAGE, ConcurrentSessionUseError, ReadOnlyRequestError

_CURRENT: Final[ContextVar[StatementTally | None]] = ContextVar(
    "sessionscope_statement_tally", default=None
)
_WRITE_PREFIX: Final = re.compile(
    r"\s*(INSERT|UPDATE|DELETE|MERGE|UPSERT|REPLACE|CREATE|DROP|ALTER|TRUNCATE|COPY)\b",
    re.IGNORECASE,
)


class StatementTally:
    """Statements one request ran on one engine, and writes run after the commit decision."""

    __slots__ = (
        "_token",
        "busy_connection",
        "busy_owner",
        "late",
        "late_writes",
        "parent",
        "pool",
        "read_only",
        "statements",
        "thread",
    )

    def __init__(self, pool: Pool | None) -> None:
        self.pool = pool
        self.statements = 0
        self.late = False
        self.late_writes = 0
        self.parent: StatementTally | None = None
        self.thread = 0
        self.read_only = False
        self.busy_connection: Connection | None = None
        """The connection running a statement for this request right now, and who runs it."""
        self.busy_owner: object = None
        """Writes raise :class:`~sessionscope.errors.ReadOnlyRequestError` (replica requests)."""
        """The thread that ran the latest statement (where a held session is being used)."""
        self._token: Token[StatementTally | None] | None = None

    def activate(self) -> None:
        """Make this tally current for the calling context (and the tasks it starts)."""
        self.parent = _CURRENT.get()
        self._token = _CURRENT.set(self)

    def deactivate(self) -> None:
        """Restore the tally that was current before :meth:`activate`."""
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None


@contextmanager
def detached() -> Iterator[None]:
    """Run a block outside the current request's tally (its statements are not counted)."""
    token = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def install(engine: Engine) -> None:
    """Listen for statements on ``engine``; idempotent."""
    for name, listener in (
        ("before_cursor_execute", _on_statement),
        ("after_cursor_execute", _on_statement_done),
        ("handle_error", _on_error),
    ):
        if not event.contains(engine, name, listener):
            event.listen(engine, name, listener)


def _tally_for(conn: Connection) -> StatementTally | None:
    tally = _CURRENT.get()
    if tally is None:
        return None
    pool = conn.engine.pool
    while tally.pool is not pool:
        parent = tally.parent
        if parent is None:
            return None
        tally = parent
    return tally


def _owner() -> object:
    """The task (on the event loop) or else the thread running this code."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # a worker thread: no event loop here
        task = None
    return task if task is not None else get_ident()


def _on_statement(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    tally = _tally_for(conn)
    if tally is None:
        return
    owner = _owner()
    if tally.busy_connection is conn and tally.busy_owner != owner:
        raise ConcurrentSessionUseError(CONCURRENT_USE_MESSAGE)
    tally.busy_connection, tally.busy_owner = conn, owner
    tally.statements += 1
    tally.thread = get_ident()
    if tally.read_only and _is_write(statement, context):
        raise ReadOnlyRequestError(
            "this request was routed to the read replica (its method is read-only), so it "
            "must not write; send writes with a non-read-only method, or leave this method "
            "out of read_only_methods"
        )
    if tally.late and _is_write(statement, context):
        tally.late_writes += 1


def _on_statement_done(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    tally = _tally_for(conn)
    if tally is not None and tally.busy_connection is conn:
        tally.busy_connection = None


def _on_error(context: Any) -> None:
    if isinstance(context.original_exception, ConcurrentSessionUseError):
        return  # raised for a second task: the first one is still running its statement
    conn = context.connection
    tally = None if conn is None else _tally_for(conn)
    if tally is not None and tally.busy_connection is conn:
        tally.busy_connection = None


def _is_write(statement: str, context: Any) -> bool:
    if context is not None and (context.isinsert or context.isupdate or context.isdelete):
        return True
    return _WRITE_PREFIX.match(statement) is not None
