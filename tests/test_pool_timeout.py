"""A request that cannot get a connection in time gets 503 with Retry-After, not a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import AsyncDBSession, DBSession
from sessionscope.tasks import gather_with_sessions
from sessionscope.testing import capture_session_events

from .metric_support import value
from .support import BACKENDS, Backend, backend_for, items

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
async def one_connection(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    """A pool of exactly one connection that gives up after 0.3 s."""
    async with backend_for(
        request.param, tmp_path, pool_size=1, max_overflow=0, pool_timeout=0.3
    ) as db:
        yield db


def holding_app(
    backend: Backend, registry: CollectorRegistry, held: anyio.Event, release: anyio.Event
) -> FastAPI:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=registry)
    if backend.is_async:

        @app.post("/hold")
        async def hold(db: AsyncDBSession) -> dict[str, str]:
            await db.execute(items.insert().values(name="held"))
            held.set()
            await release.wait()
            return {}

        @app.post("/write")
        async def write(db: AsyncDBSession) -> dict[str, str]:
            await db.execute(items.insert().values(name="second"))
            return {}

    else:

        @app.post("/hold")
        def hold(db: DBSession) -> dict[str, str]:
            db.execute(items.insert().values(name="held"))
            anyio.from_thread.run_sync(held.set)
            anyio.from_thread.run(release.wait)
            return {}

        @app.post("/write")
        def write(db: DBSession) -> dict[str, str]:
            db.execute(items.insert().values(name="second"))
            return {}

        @app.post("/write-via-state")
        def write_via_state(request: Request) -> dict[str, str]:
            # reaching the session through request.state in a thread skips admission:
            # the pool's own timeout fires instead
            request.state.db.execute(items.insert().values(name="third"))
            return {}

    return app


async def test_a_request_that_cannot_get_a_connection_in_time_gets_503_with_retry_after(
    one_connection: Backend,
) -> None:
    backend = one_connection
    registry = CollectorRegistry()
    held, release = anyio.Event(), anyio.Event()
    app = holding_app(backend, registry, held, release)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        holder: list[int] = []

        async def hold() -> None:
            holder.append((await c.post("/hold")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await held.wait()
            paths = ["/write"] + ([] if backend.is_async else ["/write-via-state"])
            for path in paths:
                second = await c.post(path)
                assert second.status_code == 503
                assert second.headers["retry-after"] == "1"
                assert "pool" in second.json()["detail"]
            release.set()
        assert holder == [200]
        assert (await c.post("/write")).status_code == 200  # serves normally afterwards
    assert backend.names() == ["held", "second"]
    assert value(registry, "db_pool_timeouts_total") >= 1
    assert value(registry, "db_pool_pending_requests") == 0


async def test_a_pool_timeout_in_gather_with_sessions_gets_503_with_retry_after(
    one_connection: Backend,
) -> None:
    """The task group raises the timeouts as an ExceptionGroup: still a 503, not a 500."""
    backend = one_connection
    registry = CollectorRegistry()
    held, release = anyio.Event(), anyio.Event()
    app = holding_app(backend, registry, held, release)

    def read(session: Any) -> int:
        return len(session.execute(items.select()).all())

    @app.get("/fanout")
    async def fanout(request: Request) -> list[int]:
        return await gather_with_sessions(request, read, read, commit=False)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        async with anyio.create_task_group() as tg:
            tg.start_soon(c.post, "/hold")
            await held.wait()
            answer = await c.get("/fanout")
            release.set()
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert "pool" in answer.json()["detail"]
        assert (await c.get("/fanout")).json() == [1, 1]  # serves normally afterwards


async def test_a_pool_timeout_closes_its_session_with_status_503_and_reason_pool_timeout(
    one_connection: Backend,
) -> None:
    backend = one_connection
    registry = CollectorRegistry()
    app = holding_app(backend, registry, anyio.Event(), anyio.Event())
    transport = httpx.ASGITransport(app=app)
    with capture_session_events() as events:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            # the pool's one connection taken outside any request: the session opens, its
            # first statement waits for the pool and times out
            if backend.is_async:
                async with backend.engine.connect():
                    assert (await c.post("/write")).status_code == 503
            else:
                with backend.engine.connect():
                    assert (await c.post("/write")).status_code == 503
    assert [e["event"] for e in events] == ["db_session.pool_timeout", "db_session.closed"]
    closed = events[-1]
    assert (closed["status"], closed["outcome"], closed["reason"]) == (
        503,
        "rollback",
        "pool_timeout",
    )
    assert value(registry, "db_session_rollbacks_total", reason="pool_timeout") == 1
    assert value(registry, "db_session_rollbacks_total", reason="exception") == 0
    assert backend.names() == []
