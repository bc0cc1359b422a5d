"""Counting the statements a request runs, through dialect listeners and a ContextVar.

The listeners are installed once per engine. Each request that passes through a
``DBSessionMiddleware`` makes its :class:`StatementTally` current; sync endpoints (run in the
threadpool with a copy of the context) and async drivers (greenlets that copy the context)
see the same tally object, so their increments land where the middleware reads them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from threading import get_ident
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import Pool

from .errors import CONCURRENT_USE_MESSAGE, ConcurrentSessionUseError, ReadOnlyRequestError

CURRENT: Final[ContextVar[StatementTally | None]] = ContextVar(
    "sessionscope_statement_tally", default=None
)
"""The tally of the request running in this context: the middleware sets it around the
application (and links the tally that was current before as its ``parent``)."""
_WRITE_PREFIX: Final = re.compile(
    # after leading comments: a writing statement, or a WITH clause holding one
    r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
    r"(?:(?:INSERT|UPDATE|DELETE|MERGE|UPSERT|REPLACE|CREATE|DROP|ALTER|TRUNCATE|COPY)\b"
    r"|WITH\b.*?(?<!FOR )\b(?:INSERT|UPDATE|DELETE|MERGE)\b)",
    re.IGNORECASE | re.DOTALL,
)


class StatementTally:
    """Statements one request ran on one engine, and writes run after the commit decision.

    Every field starts as a class-level default: most requests never run a statement, and a
    dozen attribute stores per request are a measurable share of a request that does nothing
    else.
    """

    pool: Pool | None = None
    """The pool of the engine whose statements count here."""
    statements: int = 0
    late: bool = False
    late_writes: int = 0
    parent: StatementTally | None = None
    thread: int = 0
    """The thread that ran the latest statement (where a held session is being used)."""
    read_only: bool = False
    """Writes raise :class:`~sessionscope.errors.ReadOnlyRequestError` (replica requests)."""
    busy_connection: Connection | None = None
    """The connection running a statement for this request right now, and who runs it."""
    busy_owner: object = None
    loop_thread: int = 0
    """The thread of the request's event loop (set when the request starts)."""
    loop: asyncio.AbstractEventLoop | None = None
    """That thread's running loop, looked up the first time it is needed."""

    def running_task(self) -> asyncio.Task[Any] | None:
        """The task running this code on the request's event loop; ``None`` in another thread
        (a sync session's statements run in worker threads).

        The loop is looked up once per request: on Python 3.11 every look-up of the running
        loop is also a ``getpid()`` system call (CPython's check for a fork).
        """
        if get_ident() != self.loop_thread:
            return None
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio._get_running_loop()
            if loop is None:  # not asyncio (trio): tasks are not told apart
                return None
        return asyncio.current_task(loop)


@contextmanager
def detached() -> Iterator[None]:
    """Run a block outside the current request's tally (its statements are not counted)."""
    token = CURRENT.set(None)
    try:
        yield
    finally:
        CURRENT.reset(token)


def install(engine: Engine) -> None:
    """Count and check the statements run on ``engine``; idempotent.

    The listeners are dialect-level (``do_execute`` and its siblings), each running the
    dialect's own call: a connection-level listener such as ``before_cursor_execute`` would
    make SQLAlchemy build an event dispatcher for every ``Connection``, which costs more than
    everything else sessionscope does per request.
    """
    for name, listener in (
        ("do_execute", _do_execute),
        ("do_executemany", _do_executemany),
        ("do_execute_no_params", _do_execute_no_params),
    ):
        if not event.contains(engine, name, listener):
            event.listen(engine, name, listener)


def _tally_for(conn: Connection) -> StatementTally | None:
    tally = CURRENT.get()
    if tally is None:
        return None
    pool = conn.engine.pool
    while tally.pool is not pool:
        parent = tally.parent
        if parent is None:
            return None
        tally = parent
    return tally


def _owner(tally: StatementTally) -> object:
    """The task (on the event loop) or else the thread running this code."""
    task = tally.running_task()
    return task if task is not None else get_ident()


def _do_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    conn = context.root_connection
    tally = _began(conn, statement, context)
    if tally is None:
        return False  # not a request's statement: the dialect runs it as usual
    try:
        context.dialect.do_execute(cursor, statement, parameters, context)
    finally:
        _ended(tally, conn)
    return True  # executed here: SQLAlchemy must not run it again


def _do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    conn = context.root_connection
    tally = _began(conn, statement, context)
    if tally is None:
        return False
    try:
        context.dialect.do_executemany(cursor, statement, parameters, context)
    finally:
        _ended(tally, conn)
    return True


def _do_execute_no_params(cursor: Any, statement: str, context: Any) -> bool:
    conn = context.root_connection
    tally = _began(conn, statement, context)
    if tally is None:
        return False
    try:
        context.dialect.do_execute_no_params(cursor, statement, context)
    finally:
        _ended(tally, conn)
    return True


def _began(conn: Connection, statement: str, context: Any) -> StatementTally | None:
    """Count a statement of the current request (``None`` outside requests); raise for a
    second task on the same connection or for a write on the read replica."""
    # Every statement of a Connection runs in its transaction (it autobegins one first), but
    # the dialect's own set-up queries on an engine's first connection run on a connection
    # that may not autobegin: they are not the request's statements. (Nor is a statement run
    # by a ``begin`` listener, such as SQLite's ``BEGIN`` recipe: the transaction is still
    # being begun.)
    tally = _tally_for(conn) if conn.in_transaction() else None
    if tally is None:
        return None
    owner = _owner(tally)
    if tally.busy_connection is conn and tally.busy_owner != owner:
        # Another task is running a statement on this connection: leave it marked busy.
        raise ConcurrentSessionUseError(CONCURRENT_USE_MESSAGE)
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
    tally.busy_connection, tally.busy_owner = conn, owner
    return tally


def _ended(tally: StatementTally, conn: Connection) -> None:
    if tally.busy_connection is conn:
        tally.busy_connection = None


def _is_write(statement: str, context: Any) -> bool:
    if context is not None and (context.isinsert or context.isupdate or context.isdelete):
        return True
    return _WRITE_PREFIX.match(statement) is not None
