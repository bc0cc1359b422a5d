"""Read-only transactions for the read replica, enforced by the database itself.

A check of the SQL text cannot be complete (comments, ``WITH ... INSERT``, functions with side
effects), so sessions of requests routed to ``replica_engine`` run their transactions
read-only in the database, and the database's refusal becomes
:class:`~sessionscope.errors.ReadOnlyRequestError`:

* PostgreSQL: SQLAlchemy's ``postgresql_readonly`` execution option (psycopg and asyncpg
  begin with ``BEGIN READ ONLY``; no extra round trip), reset when the connection goes back
  to the pool;
* SQLite: ``PRAGMA query_only`` on while a transaction runs, off when it ends;
* other databases: only the keyword check on statements (use a read-only database user).

Everything here is installed on a copy of the replica engine that shares its pool
(``Engine.execution_options``): a pool shared with the primary keeps writing there.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from .errors import ReadOnlyRequestError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

READ_ONLY_MESSAGE: Final = (
    "this request was routed to the read replica (its method is read-only), so it "
    "must not write; send writes with a non-read-only method, or leave this method "
    "out of read_only_methods"
)
_READ_ONLY_SQLSTATE: Final = "25006"
"""PostgreSQL's ``read_only_sql_transaction``."""


E = TypeVar("E", "Engine", "AsyncEngine")


def read_only_engine(engine: E) -> E:
    """An engine on ``engine``'s pool whose transactions the database runs read-only."""
    name = engine.dialect.name
    ro = (
        engine.execution_options(postgresql_readonly=True)
        if name == "postgresql"
        else (engine.execution_options())
    )
    sync = ro if isinstance(ro, Engine) else ro.sync_engine
    if name == "sqlite":
        event.listen(sync, "begin", _query_only_on)
        event.listen(sync, "commit", _query_only_off)
        event.listen(sync, "rollback", _query_only_off)
    event.listen(sync, "handle_error", _refused)
    return ro


def _pragma(conn: Connection, value: int) -> None:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA query_only = {value}")
    finally:
        cursor.close()


def _query_only_on(conn: Connection) -> None:
    _pragma(conn, 1)


def _query_only_off(conn: Connection) -> None:
    if not conn.invalidated:
        _pragma(conn, 0)


def _refused(context: ExceptionContext) -> None:
    """Raise :class:`ReadOnlyRequestError` for the database's refusal of a write."""
    if is_read_only_refusal(context.original_exception):
        raise ReadOnlyRequestError(READ_ONLY_MESSAGE) from context.sqlalchemy_exception


def is_read_only_refusal(exc: Any) -> bool:
    """Whether the driver error ``exc`` is the database refusing a write in a read-only
    transaction (PostgreSQL SQLSTATE 25006, SQLite ``SQLITE_READONLY``)."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if sqlstate == _READ_ONLY_SQLSTATE:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_READONLY
