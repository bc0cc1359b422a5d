"""More concurrent requests than the pool has connections: all complete, nothing waits out
the pool timeout, no connection is left checked out (the threadpool/pool deadlock)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from prometheus_client import CollectorRegistry

from sessionscope import DBSessionMiddleware

from .apps import items_app
from .support import BACKENDS, Backend, backend_for, items

pytestmark = pytest.mark.anyio

REQUESTS = 200
POOL_TIMEOUT = 20.0


@pytest.fixture(params=BACKENDS)
async def default_pool_backend(
    request: pytest.FixtureRequest, tmp_path: Any
) -> AsyncIterator[Backend]:
    """SQLAlchemy's default pool (5 + 10 overflow) with a known timeout."""
    async with backend_for(request.param, tmp_path, pool_timeout=POOL_TIMEOUT) as db:
        yield db


def state_db_app(backend: Backend) -> FastAPI:
    """Routes that use ``request.state.db`` directly, with no dependency: a sync session is
    then first touched (and its connection checked out) inside a threadpool worker."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())
    if backend.is_async:

        @app.post("/items/{name}", status_code=201)
        async def create_async(name: str, request: Request) -> dict[str, Any]:
            await request.state.db.execute(items.insert().values(name=name))
            return {"name": name}

        @app.post("/conflict/{name}")
        async def conflict_async(name: str, request: Request) -> None:
            await request.state.db.execute(items.insert().values(name=name))
            raise HTTPException(409, "conflict")

    else:

        @app.post("/items/{name}", status_code=201)
        def create(name: str, request: Request) -> dict[str, Any]:
            request.state.db.execute(items.insert().values(name=name))
            return {"name": name}

        @app.post("/conflict/{name}")
        def conflict(name: str, request: Request) -> None:
            request.state.db.execute(items.insert().values(name=name))
            raise HTTPException(409, "conflict")

    return app


@pytest.mark.parametrize(
    "build",
    [pytest.param(items_app, id="dependency"), pytest.param(state_db_app, id="request.state.db")],
)
async def test_200_concurrent_requests_on_the_default_pool_all_complete_without_pool_waits(
    default_pool_backend: Backend, build: Callable[[Backend], Any]
) -> None:
    # Through the DBSession dependency a session waits for its pool slot on the event loop;
    # through request.state.db in a def route it is first asked for in a worker thread.
    backend = default_pool_backend
    app = build(backend)
    statuses: dict[str, int] = {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:

        async def one(i: int) -> None:
            path = f"/items/ok-{i}" if i % 2 == 0 else f"/conflict/no-{i}"
            statuses[path] = (await c.post(path)).status_code

        async with anyio.create_task_group() as tg:
            for i in range(REQUESTS):
                tg.start_soon(one, i)
    elapsed = time.monotonic() - started
    assert Counter(statuses.values()) == {201: REQUESTS // 2, 409: REQUESTS // 2}
    assert backend.names() == sorted(f"ok-{i}" for i in range(0, REQUESTS, 2))
    assert elapsed < POOL_TIMEOUT / 2, f"requests waited for a pool checkout ({elapsed:.1f}s)"
    assert backend.checkedout() == 0
