"""Test support: database backends and a raw ASGI harness that records what the client saw.

Every lifecycle test runs against four backends: SQLite (sync and aiosqlite) and a real
PostgreSQL server (psycopg and asyncpg). PostgreSQL comes from SESSIONSCOPE_TEST_POSTGRES_URL
(``postgresql://user@host:port/db``); without it those tests skip, and with
SESSIONSCOPE_REQUIRE_POSTGRES=1 a missing server fails them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

POSTGRES_URL_ENV = "SESSIONSCOPE_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "SESSIONSCOPE_REQUIRE_POSTGRES"

metadata = sa.MetaData()
items = sa.Table(
    "ss_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
)
parents = sa.Table("ss_parents", metadata, sa.Column("id", sa.Integer, primary_key=True))
children = sa.Table(
    "ss_children",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "parent_id",
        sa.Integer,
        sa.ForeignKey("ss_parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)


def postgres_url() -> str | None:
    """The plain ``postgresql://`` URL of the test server, or skip (fail when required)."""
    url = os.environ.get(POSTGRES_URL_ENV)
    required = os.environ.get(REQUIRE_POSTGRES_ENV) == "1"
    if not url:
        if required:
            pytest.fail(f"{REQUIRE_POSTGRES_ENV}=1 but {POSTGRES_URL_ENV} is not set")
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_URL_ENV}=postgresql://user@host:port/db "
            "(e.g. postgresql://postgres@127.0.0.1:5432/test; .ci/run sets it)"
        )
    try:
        engine = sa.create_engine(driver_url(url, async_=False), poolclass=sa.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # the server is down or the URL is wrong
        if required:
            pytest.fail(f"PostgreSQL at {url} is required but unreachable: {exc}")
        pytest.skip(f"PostgreSQL at {url} is unreachable: {exc}")
    return url


def driver_url(url: str, *, async_: bool) -> str:
    """``postgresql://`` -> ``postgresql+asyncpg://`` or ``postgresql+psycopg://``."""
    driver = "postgresql+asyncpg" if async_ else "postgresql+psycopg"
    return make_url(url).set(drivername=driver).render_as_string(hide_password=False)


@dataclass
class Backend:
    """One database under test: the engine handed to the middleware and a way to check it."""

    id: str
    engine: Engine | AsyncEngine
    check: Engine
    """A sync engine on the same database, for reading rows behind the app's back."""
    log: list[tuple[Any, ...]] = field(default_factory=list)
    """COMMIT/ROLLBACK (with the thread they ran on), in order with client messages."""

    @property
    def is_async(self) -> bool:
        return isinstance(self.engine, AsyncEngine)

    @property
    def sync_engine(self) -> Engine:
        return self.engine.sync_engine if isinstance(self.engine, AsyncEngine) else self.engine

    def checkedout(self) -> int:
        return int(self.sync_engine.pool.checkedout())  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        with self.check.connect() as conn:
            return sorted(conn.execute(sa.select(items.c.name)).scalars())

    def events(self) -> list[str]:
        return [entry[0] for entry in self.log]

    async def run(self, session: Session | AsyncSession, fn: Callable[[Session], Any]) -> Any:
        """Run ``fn(sync_session)`` as an app would: awaited if async, in a thread if sync."""
        if isinstance(session, AsyncSession):
            return await session.run_sync(fn)
        return await anyio.to_thread.run_sync(fn, session)

    async def insert(self, session: Session | AsyncSession, name: str) -> None:
        await self.run(session, lambda s: s.execute(items.insert().values(name=name)))

    async def count(self, session: Session | AsyncSession) -> int:
        return int(
            await self.run(
                session, lambda s: s.execute(sa.select(sa.func.count()).select_from(items)).scalar()
            )
        )

    async def dispose(self) -> None:
        if isinstance(self.engine, AsyncEngine):
            await self.engine.dispose()
        else:
            self.engine.dispose()
        self.check.dispose()


def _record_transactions(backend: Backend) -> None:
    def on_commit(conn: Any) -> None:
        backend.log.append(("COMMIT", threading.current_thread().name))

    def on_rollback(conn: Any) -> None:
        backend.log.append(("ROLLBACK", threading.current_thread().name))

    event.listen(backend.sync_engine, "commit", on_commit)
    event.listen(backend.sync_engine, "rollback", on_rollback)


def _sqlite_fk_on(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _fk(dbapi_conn: Any, record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def make_backend(kind: str, tmp_path: Any, **engine_kw: Any) -> Backend:
    """Build backend ``kind`` (sqlite-sync, sqlite-async, pg-sync, pg-async) with fresh tables."""
    if kind.startswith("sqlite"):
        file = tmp_path / "test.db"
        check = sa.create_engine(f"sqlite:///{file}", poolclass=sa.NullPool)
        _sqlite_fk_on(check)
        engine: Engine | AsyncEngine
        engine_kw.setdefault("connect_args", {"timeout": 30})
        if kind == "sqlite-async":
            engine = create_async_engine(f"sqlite+aiosqlite:///{file}", **engine_kw)
        else:
            engine = sa.create_engine(f"sqlite:///{file}", **engine_kw)
        _sqlite_fk_on(engine.sync_engine if isinstance(engine, AsyncEngine) else engine)
        metadata.create_all(check)
    else:
        url = postgres_url()
        assert url is not None
        check = sa.create_engine(driver_url(url, async_=False), poolclass=sa.NullPool)
        with check.begin() as conn:
            # fail fast instead of hanging if a transaction somewhere still holds the tables
            conn.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
            metadata.drop_all(conn)
            metadata.create_all(conn)
        if kind == "pg-async":
            engine = create_async_engine(driver_url(url, async_=True), **engine_kw)
        else:
            engine = sa.create_engine(driver_url(url, async_=False), **engine_kw)
    backend = Backend(kind, engine, check)
    _record_transactions(backend)
    return backend


BACKENDS = ["sqlite-sync", "sqlite-async", "pg-sync", "pg-async"]


@asynccontextmanager
async def backend_for(kind: str, tmp_path: Any, **engine_kw: Any) -> AsyncIterator[Backend]:
    """Backend ``kind`` for one test; afterwards no connection may be left checked out."""
    db = make_backend(kind, tmp_path, **engine_kw)
    try:
        yield db
        assert db.checkedout() == 0, "a connection was left checked out after the test"
    finally:
        await db.dispose()


# ---------------------------------------------------------------------------- ASGI harness

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass
class Exchange:
    """What the client received for one request."""

    messages: list[Message]

    @property
    def status(self) -> int:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one response start, got {self.messages}"
        return int(starts[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"
        )

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start.get("headers", [])}

    def assert_well_formed(self) -> None:
        """Exactly one start, bodies after it, nothing after the last body."""
        types = [m["type"] for m in self.messages]
        assert types[0] == "http.response.start", types
        assert types.count("http.response.start") == 1, types
        bodies = self.messages[1:]
        assert all(m["type"] == "http.response.body" for m in bodies), types
        assert bodies, types
        assert all(m.get("more_body", False) for m in bodies[:-1]), self.messages
        assert not bodies[-1].get("more_body", False), self.messages


def http_scope(
    path: str = "/", method: str = "GET", headers: Sequence[tuple[bytes, bytes]] = ()
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def request(
    app: ASGIApp,
    path: str = "/",
    *,
    log: list[tuple[Any, ...]] | None = None,
    method: str = "GET",
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    scope: dict[str, Any] | None = None,
    messages: list[Message] | None = None,
) -> Exchange:
    """Call ``app`` once; client messages are appended to ``log`` (and ``messages``) as they
    arrive, so a caller keeps what was sent even when the app raises."""
    messages = [] if messages is None else messages
    disconnected = anyio.Event()
    sent_body = False

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)
        if log is not None:
            log.append(("SEND", message["type"], message.get("status")))

    try:
        await app(scope or http_scope(path, method, headers), receive, send)
    finally:
        disconnected.set()
    return Exchange(messages)


async def wait_until(check: Callable[[], object]) -> None:
    """Poll ``check()`` until it is true, at most 5 s: for what a thread of its own does (the
    leak sweep, worker threads), which has no event to await."""
    with anyio.fail_after(5):
        while not check():  # noqa: ASYNC110 - the thread has no event to await
            await anyio.sleep(0.01)
