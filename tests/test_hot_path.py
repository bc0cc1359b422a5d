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
        assert value(registry, "db_pool_use_seconds_count") == 1  # pool metrics measured
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
