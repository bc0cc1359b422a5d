"""What sessionscope adds to every statement: counted through dialect events, nothing per
connection, and the user's own statement listeners untouched."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from sessionscope import DBSessionMiddleware

from .metric_support import value
from .support import Backend, items, request

pytestmark = pytest.mark.anyio


def statements_app(backend: Backend, rows: int) -> Any:
    """Inserts ``rows`` rows with one executemany, reads them back, answers 201."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]

        def work(sync: Any) -> None:
            sync.execute(items.insert(), [{"name": f"row-{i}"} for i in range(rows)])
            sync.execute(sa.select(items.c.id)).all()

        if isinstance(session, AsyncSession):
            await session.run_sync(work)
        else:
            await backend.run(session, work)
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body"})

    return app


async def test_the_middleware_adds_no_connection_level_listener_to_the_engine(
    backend: Backend,
) -> None:
    # A connection-level listener (before_cursor_execute, engine_disposed, ...) makes SQLAlchemy
    # build an event dispatcher for every Connection: a cost on every request. The test
    # backends record COMMIT/ROLLBACK with such listeners, so this test has an engine of its own.
    url = backend.sync_engine.url
    engine: Engine | AsyncEngine = (
        create_async_engine(url) if backend.is_async else sa.create_engine(url)
    )
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    try:
        registry = CollectorRegistry()
        middleware = DBSessionMiddleware(
            statements_app(backend, 3), engine=engine, registry=registry
        )
        ex = await request(middleware, method="POST")
        assert ex.status == 201
        assert sync_engine._has_events is False
        # not the dialect's set-up queries on the engine's first connection
        assert value(registry, "db_statements_total", route="__unmatched__") == 2
        assert value(registry, "db_pool_wait_seconds_count") == 1  # pool metrics measured
        assert sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        if isinstance(engine, AsyncEngine):
            await engine.dispose()
        else:
            engine.dispose()
    assert sync_engine._has_events is False


async def test_executemany_and_plain_statements_are_counted_and_run_once(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    middleware = DBSessionMiddleware(
        statements_app(backend, 5), engine=backend.engine, registry=registry
    )
    ex = await request(middleware, method="POST")
    assert ex.status == 201
    assert value(registry, "db_statements_total", route="__unmatched__") >= 2
    assert backend.names() == [f"row-{i}" for i in range(5)]  # each row inserted once


async def test_a_users_own_statement_listeners_still_see_every_statement(
    backend: Backend,
) -> None:
    seen: list[str] = []

    @event.listens_for(backend.sync_engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement.split()[0].upper())

    registry = CollectorRegistry()
    middleware = DBSessionMiddleware(
        statements_app(backend, 2), engine=backend.engine, registry=registry
    )
    ex = await request(middleware, method="POST")
    assert ex.status == 201
    assert "INSERT" in seen
    assert "SELECT" in seen
    assert backend.names() == ["row-0", "row-1"]


async def test_aiosqlite_requests_make_no_round_trip_for_a_commit_or_rollback_sqlite_would_skip(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosqlite runs every call on its own thread. After reads SQLite has no transaction open,
    # so the commit, and the rollback the pool makes on return, would change nothing.
    import aiosqlite.core

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'trips.sqlite'}")
    async with engine.begin() as conn:
        await conn.run_sync(items.metadata.create_all)
    trips: list[str] = []
    real = aiosqlite.core.Connection._execute

    async def counting(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(fn, "__name__", ""))
        return await real(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.core.Connection, "_execute", counting)

    def app(status: int, name: str | None) -> Any:
        async def handle(scope: Any, receive: Any, send: Any) -> None:
            session = scope["state"]["db"]
            if name is not None:
                await session.execute(items.insert().values(name=name))
            await session.execute(sa.select(items.c.name))
            await send({"type": "http.response.start", "status": status})
            await send({"type": "http.response.body"})

        return DBSessionMiddleware(handle, engine=engine, metrics=False)

    async def names() -> list[str]:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.select(items.c.name))).scalars())

    try:
        for status, name, commits, rollbacks in (
            (200, None, 0, 0),  # reads only: neither trip
            (201, "kept", 1, 0),  # a real commit; nothing left to roll back on return
            (409, "dropped", 0, 1),  # a real rollback; nothing left on return
        ):
            trips.clear()
            assert (await request(app(status, name))).status == status
            assert (trips.count("commit"), trips.count("rollback")) == (commits, rollbacks)
        assert await names() == ["kept"]
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
