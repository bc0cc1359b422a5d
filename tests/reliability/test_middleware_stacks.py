"""The promises hold in the middleware stacks users really build, on PostgreSQL (psycopg, asyncpg).

``@app.middleware("http")`` (FastAPI's tutorial) and any ``BaseHTTPMiddleware`` subclass run the
application in a task of their own and forward its messages from another task. Registered
before ``DBSessionMiddleware`` they sit inside it: the application's streaming body then runs
while the middleware decides on the response start the inner middleware forwarded. The
decision and the body's statements must not overlap: the stream comes out whole, what it
writes after the decision is rolled back, and no connection goes back to the pool inside a
transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sessionscope import DBSessionMiddleware

from ..support import items
from .helpers import Client, checkedout, dispose, pg_engine, sample, wait_until_quiet

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KINDS = ["pg-sync", "pg-async"]
REQUESTS = 15


class PassThrough(BaseHTTPMiddleware):
    """The smallest ``BaseHTTPMiddleware``: it only adds a header."""

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["x-inner"] = "subclass"
        return response


def add_inner_http_middleware(app: FastAPI, style: str) -> None:
    """An inner ``BaseHTTPMiddleware``, the way users add one."""
    if style == "subclass":
        app.add_middleware(PassThrough)
        return

    @app.middleware("http")
    async def add_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers["x-inner"] = "decorator"
        return response


def names(check: Engine) -> set[str]:
    with check.connect() as conn:
        return set(conn.execute(sa.select(items.c.name)).scalars())


def count_named(name: str) -> sa.Select[Any]:
    return sa.select(sa.func.count()).select_from(items).where(items.c.name == name)


def streaming_app(engine: Engine | AsyncEngine, registry: CollectorRegistry, style: str) -> FastAPI:
    """``POST /write/{i}`` writes ``endpoint-i`` and streams what it reads through the session,
    writing ``late-i`` after its first chunk; ``GET /read/{i}`` only reads, in both places."""
    app = FastAPI()
    if isinstance(engine, AsyncEngine):

        @app.post("/write/{i}")
        async def write_async(request: Request, i: int) -> StreamingResponse:
            db: AsyncSession = request.state.db
            await db.execute(items.insert().values(name=f"endpoint-{i}"))

            async def body() -> AsyncIterator[bytes]:
                yield b"endpoint=%d;" % (await db.scalar(count_named(f"endpoint-{i}")) or 0)
                await db.execute(items.insert().values(name=f"late-{i}"))
                yield b"late=%d;" % (await db.scalar(count_named(f"late-{i}")) or 0)

            return StreamingResponse(body())

        @app.get("/read/{i}")
        async def read_async(request: Request, i: int) -> StreamingResponse:
            db: AsyncSession = request.state.db
            before = await db.scalar(count_named("nobody")) or 0

            async def body() -> AsyncIterator[bytes]:
                for _ in range(3):  # two statements a chunk: the second may start mid-decision
                    first = await db.scalar(count_named("nobody")) or 0
                    yield b"%d;" % (before + first + (await db.scalar(count_named("x")) or 0))

            return StreamingResponse(body())

    else:

        @app.post("/write/{i}")
        def write_sync(request: Request, i: int) -> StreamingResponse:
            db: Session = request.state.db
            db.execute(items.insert().values(name=f"endpoint-{i}"))

            def body() -> Iterator[bytes]:
                yield b"endpoint=%d;" % (db.scalar(count_named(f"endpoint-{i}")) or 0)
                db.execute(items.insert().values(name=f"late-{i}"))
                yield b"late=%d;" % (db.scalar(count_named(f"late-{i}")) or 0)

            return StreamingResponse(body())

        @app.get("/read/{i}")
        def read_sync(request: Request, i: int) -> StreamingResponse:
            db: Session = request.state.db
            before = db.scalar(count_named("nobody")) or 0

            def body() -> Iterator[bytes]:
                for _ in range(3):  # two statements a chunk: the second may start mid-decision
                    first = db.scalar(count_named("nobody")) or 0
                    yield b"%d;" % (before + first + (db.scalar(count_named("x")) or 0))

            return StreamingResponse(body())

    add_inner_http_middleware(app, style)
    app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)
    return app


@pytest.mark.parametrize("style", ["subclass", "decorator"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_behind_an_inner_http_middleware_comes_out_whole_and_late_writes_roll_back(
    kind: str, style: str, pg_url: str, check: Engine, app_name: str
) -> None:
    engine = pg_engine(pg_url, async_=kind == "pg-async", application_name=app_name, pool_size=2)
    registry = CollectorRegistry()
    client = Client(streaming_app(engine, registry, style))
    try:
        for i in range(REQUESTS):
            written = await client.call(f"/write/{i}", method="POST")
            read = await client.call(f"/read/{i}")
            for outcome, body in ((written, b"endpoint=1;late=1;"), (read, b"0;0;0;")):
                assert outcome.error is None, outcome.error
                assert outcome.status == 200, outcome.messages
                assert outcome.headers["x-inner"] == style
                outcome.exchange.assert_well_formed()
                assert outcome.body == body
        assert checkedout(engine) == 0
        assert await wait_until_quiet(check, app_name) == 0  # no backend idle in transaction
        assert names(check) == {f"endpoint-{i}" for i in range(REQUESTS)}  # no late-i
        assert sample(registry, "db_sessions_open") == 0
    finally:
        with anyio.CancelScope(shield=True):
            await dispose(engine)
