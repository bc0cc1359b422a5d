"""1,000 concurrent requests over sync and async routes never share a session or a transaction.

A FastAPI application with two databases (a psycopg engine for ``def`` routes, an asyncpg
engine for ``async def`` routes) serves 1,000 requests at once through
``httpx.AsyncClient(transport=ASGITransport(app))``. Each request writes its own marker and then
asks PostgreSQL, through its own session, which rows its transaction wrote (``xmin``) and
whether it can see any row another request wrote but never committed. Every tenth request is a
rejected write (``409``): if any other request saw it, isolation would be broken.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession, get_session

from ..support import items
from .helpers import checkedout, dispose, pg_engine, sample

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

REQUESTS = 1000
REJECT_EVERY = 10

OWN_ROWS = sa.text(
    "select name from ss_items "
    "where xmin = (pg_current_xact_id()::text::bigint % 4294967296)::text::xid"
)
"""Rows written by the current transaction (its own uncommitted writes)."""
FOREIGN_REJECTS = sa.text(
    "select count(*) from ss_items where name like 'reject-%' and name <> :marker"
)
"""Rejected (never committed) writes of other requests visible to this transaction."""


class LiveSessions:
    """Sessions of requests in flight: one session may never serve two at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, str] = {}
        self.clashes: list[tuple[str, str]] = []
        self.reused: list[str] = []

    def enter(self, session: Any, marker: str) -> None:
        sync = session.sync_session if isinstance(session, AsyncSession) else session
        with self._lock:
            other = self._live.get(id(sync))
            if other is not None:
                self.clashes.append((other, marker))
            self._live[id(sync)] = marker
            if "marker" in sync.info:
                self.reused.append(marker)
            sync.info["marker"] = marker

    def leave(self, session: Any) -> None:
        sync = session.sync_session if isinstance(session, AsyncSession) else session
        with self._lock:
            self._live.pop(id(sync), None)


def build_app(sync_engine: Engine, async_engine: AsyncEngine, live: LiveSessions) -> FastAPI:
    app = FastAPI()
    async_db = Depends(get_session("async_db", kind=AsyncSession))

    @app.post("/sync/{marker}")
    def write_sync(marker: str, session: DBSession) -> JSONResponse:
        live.enter(session, marker)
        try:
            session.execute(items.insert().values(name=marker))
            own = list(session.execute(OWN_ROWS).scalars())
            foreign = session.execute(FOREIGN_REJECTS, {"marker": marker}).scalar()
        finally:
            live.leave(session)
        return answer(marker, own, foreign)

    @app.post("/async/{marker}")
    async def write_async(marker: str, session: AsyncSession = async_db) -> JSONResponse:
        live.enter(session, marker)
        try:
            await session.execute(items.insert().values(name=marker))
            await anyio.lowlevel.checkpoint()  # let other requests interleave mid-transaction
            own = list((await session.execute(OWN_ROWS)).scalars())
            foreign = (await session.execute(FOREIGN_REJECTS, {"marker": marker})).scalar()
        finally:
            live.leave(session)
        return answer(marker, own, foreign)

    registry = CollectorRegistry()
    app.add_middleware(DBSessionMiddleware, engine=sync_engine, registry=registry)
    app.add_middleware(
        DBSessionMiddleware,
        engine=async_engine,
        name="async_db",
        state_key="adb",
        registry=registry,
    )
    app.state.registry = registry
    return app


def answer(marker: str, own: list[str], foreign: Any) -> JSONResponse:
    status = 409 if marker.startswith("reject-") else 201
    return JSONResponse({"own": own, "foreign_rejects": int(foreign)}, status_code=status)


@pytest.fixture
async def engines(
    pg_url: str, check: Engine, app_name: str
) -> AsyncIterator[tuple[Engine, AsyncEngine]]:
    pool: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 10,
        "pool_timeout": 30,
        "connect_timeout": 15.0,
    }
    sync_engine = pg_engine(pg_url, async_=False, application_name=app_name, **pool)
    async_engine = pg_engine(pg_url, async_=True, application_name=app_name, **pool)
    assert isinstance(sync_engine, Engine)
    assert isinstance(async_engine, AsyncEngine)
    try:
        yield sync_engine, async_engine
    finally:
        await dispose(sync_engine)
        await dispose(async_engine)


async def test_concurrent_requests_never_see_another_requests_session_or_uncommitted_rows(
    engines: tuple[Engine, AsyncEngine], check: Engine
) -> None:
    sync_engine, async_engine = engines
    live = LiveSessions()
    app = build_app(sync_engine, async_engine, live)
    paths: list[tuple[str, str]] = []
    for i in range(REQUESTS):
        marker = f"reject-{i:04d}" if i % REJECT_EVERY == 0 else f"ok-{i:04d}"
        paths.append((marker, f"/{'sync' if i % 2 else 'async'}/{marker}"))
    results: dict[str, httpx.Response] = {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def one(marker: str, path: str) -> None:
            results[marker] = await client.post(path)

        async with anyio.create_task_group() as tg:
            for marker, path in paths:
                tg.start_soon(one, marker, path)

    assert len(results) == REQUESTS
    statuses = Counter(r.status_code for r in results.values())
    assert statuses == {201: REQUESTS - REQUESTS // REJECT_EVERY, 409: REQUESTS // REJECT_EVERY}
    for marker, response in results.items():
        body = response.json()
        assert body["own"] == [marker], (marker, body)  # its transaction wrote only its row
        assert body["foreign_rejects"] == 0, (marker, body)  # never saw uncommitted rows
    assert live.clashes == []
    assert live.reused == []
    with check.connect() as conn:
        in_db = set(conn.execute(sa.select(items.c.name)).scalars())
    assert in_db == {m for m in results if not m.startswith("reject-")}
    assert checkedout(sync_engine) == 0
    assert checkedout(async_engine) == 0
    registry = app.state.registry
    assert sample(registry, "db_sessions_open") == 0
    assert sample(registry, "db_sessions_open", db="async_db") == 0
