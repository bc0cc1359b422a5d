"""The benchmark database: one table, seeded rows, SQLite file or PostgreSQL URLs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

POSTGRES_URL_ENV = "BENCH_POSTGRES_URL"
"""``postgresql://user@host:port/db`` of the server for asyncpg and end-to-end runs."""
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SEED_ROWS = 100

metadata = sa.MetaData()
items = sa.Table(
    "bench_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(100), nullable=False),
)


@dataclass(frozen=True)
class Urls:
    """The URLs of one database, for each driver the contenders use."""

    sync: str
    async_: str


def sqlite_urls(directory: Path) -> Urls:
    """A SQLite file database in ``directory`` (pysqlite and aiosqlite)."""
    path = (directory / "bench.sqlite3").resolve()
    return Urls(sync=f"sqlite:///{path}", async_=f"sqlite+aiosqlite:///{path}")


def postgres_urls(base: str | None = None) -> Urls:
    """The PostgreSQL server from ``BENCH_POSTGRES_URL`` (psycopg and asyncpg)."""
    url = sa.make_url(base or os.environ.get(POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL))

    def render(driver: str) -> str:
        return url.set(drivername=driver).render_as_string(hide_password=False)

    return Urls(sync=render("postgresql+psycopg"), async_=render("postgresql+asyncpg"))


def postgres_available(urls: Urls) -> bool:
    """Whether the PostgreSQL server answers."""
    try:
        engine = sa.create_engine(urls.sync, poolclass=sa.NullPool, connect_args=_timeout(urls))
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception:  # the server is down, or no driver
        return False
    return True


def _timeout(urls: Urls) -> dict[str, Any]:
    return {"connect_timeout": 3} if urls.sync.startswith("postgresql") else {}


def prepare(urls: Urls) -> None:
    """(Re)create ``bench_items`` with ``SEED_ROWS`` rows."""
    install_sqlite_pragmas()
    engine = sa.create_engine(urls.sync, poolclass=sa.NullPool)
    with engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(items.insert(), [{"name": f"item-{i}"} for i in range(1, SEED_ROWS + 1)])
    engine.dispose()


def item_id(i: int) -> int:
    """A seeded row's id for the ``i``-th request."""
    return i % SEED_ROWS + 1


def install_sqlite_pragmas() -> None:
    """Every SQLite connection of every engine in this process: WAL, synchronous=NORMAL.

    Listening on the ``Engine`` class reaches the engines the peers create themselves too, so
    every contender runs on identically configured connections.
    """
    if not event.contains(Engine, "connect", _sqlite_pragmas):
        event.listen(Engine, "connect", _sqlite_pragmas)


def remove_sqlite_pragmas() -> None:
    """Undo :func:`install_sqlite_pragmas` (for test runs sharing the process)."""
    if event.contains(Engine, "connect", _sqlite_pragmas):
        event.remove(Engine, "connect", _sqlite_pragmas)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    if "sqlite" not in type(dbapi_connection).__module__:
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
