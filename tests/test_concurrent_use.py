"""The request session used by two tasks at once raises a clear error, not an opaque one."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession

from sessionscope import ConcurrentSessionUseError, DBSessionMiddleware

from .support import Backend, request

pytestmark = pytest.mark.anyio


def slow_statement(backend: Backend) -> sa.TextClause:
    """A statement that keeps its connection busy for a while."""
    if backend.id.startswith("pg"):
        return sa.text("SELECT pg_sleep(0.3)")
    return sa.text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
        "SELECT count(*) FROM c"
    )


async def test_two_tasks_on_the_request_session_get_a_clear_error(backend: Backend) -> None:
    statement = slow_statement(backend)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.count(session)  # the session holds its connection from here on

        async def use() -> None:
            if isinstance(session, AsyncSession):
                # Shielded like the thread below (a started worker thread is always waited
                # for): aiosqlite cannot be cancelled mid-statement cleanly. SQLAlchemy then
                # terminates the connection, and aiosqlite's graceful close, interrupted, waits
                # forever on a worker thread that has already stopped.
                with anyio.CancelScope(shield=True):
                    await session.execute(statement)
            else:
                await anyio.to_thread.run_sync(session.execute, statement)

        async with anyio.create_task_group() as tg:
            tg.start_soon(use)
            tg.start_soon(use)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    middleware = DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry())
    with pytest.raises(ConcurrentSessionUseError, match="gather_with_sessions") as raised:
        await request(middleware)
    assert isinstance(raised.value, sa.exc.InvalidRequestError)  # still catchable as before
    assert backend.checkedout() == 0


async def test_sequential_use_from_several_tasks_is_fine(backend: Backend) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.count, session)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    ex = await request(
        DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry())
    )
    assert ex.status == 200
