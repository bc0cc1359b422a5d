"""aiosqlite: no round trip to its thread for a commit or rollback that SQLite would skip.

aiosqlite runs every call on a thread of its own and SQLAlchemy's adapter awaits each one, so a
``commit()`` or ``rollback()`` costs a round trip to that thread even when SQLite has no
transaction open, and then Python's ``sqlite3`` does nothing: it begins a transaction at the
first write only, and commits or rolls back only ``if in_transaction``. After a request that
only read, the commit and the rollback the pool makes when the connection comes back are two
such round trips. :func:`install` makes an aiosqlite engine's dialect ask ``in_transaction`` on
the event loop first and skip the call when it is ``False``: the check ``sqlite3`` would make,
without the trip. Connection events (``commit``, ``rollback``) still fire as before.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy.engine import Engine

_INSTALLED: Final = "_sessionscope_aiosqlite_idle"


def install(engine: Engine) -> None:
    """Skip idle commits and rollbacks on ``engine`` if its driver is aiosqlite; idempotent."""
    dialect: Any = engine.dialect
    if dialect.driver != "aiosqlite" or getattr(dialect, _INSTALLED, False):
        return
    # On the dialect instance: Connection and the pool's reset-on-return both call these.
    dialect.do_commit = _unless_idle(dialect.do_commit)
    dialect.do_rollback = _unless_idle(dialect.do_rollback)
    setattr(dialect, _INSTALLED, True)


def _unless_idle(call: Callable[[Any], None]) -> Callable[[Any], None]:
    def unless_idle(dbapi_connection: Any) -> None:
        if not holds_no_transaction(dbapi_connection):
            call(dbapi_connection)

    return unless_idle


def holds_no_transaction(connection: Any) -> bool:
    """Whether the SQLite connection behind an aiosqlite pool connection (or adapter) is known
    to have no transaction open; ``False`` when that cannot be told (closed, another shape)."""
    adapter = getattr(connection, "dbapi_connection", connection)
    sqlite = getattr(getattr(adapter, "_connection", None), "_connection", None)
    if not isinstance(sqlite, sqlite3.Connection):
        return False
    try:
        return sqlite.in_transaction is False
    except sqlite3.Error:  # closed: the driver's own call reports or ignores it
        return False
