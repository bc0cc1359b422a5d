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
import sqlalchemy as sa
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession

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


STREAMS = 4
READS = 8
CHUNKS = 5


def streaming_exports_app(backend: Backend, readers_arrived: anyio.Event) -> FastAPI:
    """Exports that stream their rows, reading each chunk with the request's sync session
    after the response started (the session is used after its decision), and a plain read."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())
    first_chunks: list[int] = []
    streaming = anyio.Event()
    app.state.streaming = streaming

    @app.get("/export/{n}")
    def export(n: int, db: DBSession) -> StreamingResponse:
        db.execute(sa.select(1))  # used before the decision too: the request takes its slot

        def chunk(i: int) -> bytes:
            return f"{db.execute(sa.select(sa.literal(n * 100 + i))).scalar_one()};".encode()

        async def rows() -> AsyncIterator[bytes]:
            for i in range(CHUNKS):
                # One threadpool call per chunk, as Starlette iterates a sync generator.
                yield await run_in_threadpool(chunk, i)
                if i == 0:
                    first_chunks.append(n)
                    if len(first_chunks) == STREAMS:
                        streaming.set()
                    await readers_arrived.wait()

        return StreamingResponse(rows(), media_type="text/plain")

    @app.get("/read/{n}")
    def read(n: int, db: DBSession) -> dict[str, int]:
        return {"n": db.execute(sa.select(sa.literal(n))).scalar_one()}

    return app


async def test_reads_arriving_while_streams_use_their_sessions_after_the_decision_all_succeed(
    tmp_path: Any,
) -> None:
    # As many threadpool threads as pool connections (4 = 4). Each stream keeps a connection
    # for its late transaction; the reads must not take every thread waiting for one, or the
    # streams never get a thread to finish and every read waits out the pool timeout (503).
    async with backend_for(
        "pg-sync", tmp_path, pool_size=STREAMS, max_overflow=0, pool_timeout=5
    ) as backend:
        limiter = anyio.to_thread.current_default_thread_limiter()
        tokens, limiter.total_tokens = limiter.total_tokens, STREAMS
        readers_arrived = anyio.Event()
        app = streaming_exports_app(backend, readers_arrived)
        bodies: dict[str, tuple[int, str]] = {}
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        try:
            with anyio.fail_after(60):
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

                    async def get(path: str) -> None:
                        response = await c.get(path, timeout=60)
                        bodies[path] = (response.status_code, response.text)

                    async with anyio.create_task_group() as tg:
                        for n in range(STREAMS):
                            tg.start_soon(get, f"/export/{n}")
                        await app.state.streaming.wait()  # every stream holds a connection
                        for n in range(READS):
                            tg.start_soon(get, f"/read/{n}")
                        await anyio.wait_all_tasks_blocked()  # the reads are all waiting
                        readers_arrived.set()
        finally:
            limiter.total_tokens = tokens
        assert {path: bodies[path] for path in bodies if path.startswith("/read")} == {
            f"/read/{n}": (200, f'{{"n":{n}}}') for n in range(READS)
        }
        assert {path: bodies[path] for path in bodies if path.startswith("/export")} == {
            f"/export/{n}": (200, "".join(f"{n * 100 + i};" for i in range(CHUNKS)))
            for n in range(STREAMS)
        }
