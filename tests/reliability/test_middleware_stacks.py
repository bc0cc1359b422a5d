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

import gzip
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sessionscope import DBSessionMiddleware, MiddlewareOrderWarning

from ..support import items
from .helpers import (
    Client,
    checkedout,
    dispose,
    pg_engine,
    sample,
    sync_engine_of,
    wait_until_quiet,
)

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


@pytest.mark.parametrize("kind", KINDS)
async def test_a_statement_started_while_the_decision_commits_waits_for_it_and_runs_late(
    kind: str, pg_url: str, check: Engine, app_name: str
) -> None:
    """The request's COMMIT is held until the stream has started a statement of its own: that
    statement waits for the decision, then reads in a new transaction (no error, whole body)."""
    engine = pg_engine(pg_url, async_=kind == "pg-async", application_name=app_name)
    committing, release = threading.Event(), threading.Event()
    loop_committing = anyio.Event()
    token = anyio.lowlevel.current_token()

    def hold_commit(conn: Any) -> None:
        if committing.is_set():
            return
        committing.set()
        if isinstance(engine, AsyncEngine):
            loop_committing.set()
            await_only(release_async.wait())  # in the commit's greenlet, on the event loop
        else:
            anyio.from_thread.run_sync(loop_committing.set, token=token)
            release.wait()

    release_async = anyio.Event()
    event.listen(sync_engine_of(engine), "commit", hold_commit)
    app = FastAPI()
    if isinstance(engine, AsyncEngine):

        @app.post("/")
        async def write_async(request: Request) -> StreamingResponse:
            db: AsyncSession = request.state.db
            await db.execute(items.insert().values(name="endpoint"))

            async def body() -> AsyncIterator[bytes]:
                await loop_committing.wait()
                yield b"%d;" % (await db.scalar(count_named("endpoint")) or 0)

            return StreamingResponse(body())

    else:

        @app.post("/")
        def write_sync(request: Request) -> StreamingResponse:
            db: Session = request.state.db
            db.execute(items.insert().values(name="endpoint"))

            def body() -> Iterator[bytes]:
                committing.wait()
                yield b"%d;" % (db.scalar(count_named("endpoint")) or 0)

            return StreamingResponse(body())

    add_inner_http_middleware(app, "decorator")
    app.add_middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry())
    client = Client(app)

    async def release_the_commit() -> None:
        await loop_committing.wait()
        await anyio.sleep(0.2)  # give the stream's statement time to start (not asserted on)
        release.set()
        release_async.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(release_the_commit)
            outcome = await client.call("/", method="POST")
        assert outcome.error is None, outcome.error
        assert outcome.status == 200
        assert outcome.body == b"1;"
        assert names(check) == {"endpoint"}
        assert checkedout(engine) == 0
        assert await wait_until_quiet(check, app_name) == 0
    finally:
        release.set()
        with anyio.CancelScope(shield=True):
            await dispose(engine)


# ------------------------------------------------------------ a middleware holding the start
#
# GZipMiddleware holds the response start until the first body chunk (it must see the body to
# choose its headers). Inside DBSessionMiddleware it moves the decision there: what a stream
# does before its first chunk joins the request's transaction. Outside, the decision is made
# at the application's own start as everywhere else. The middleware warns at build time when
# such a holder is inside it.

CHUNK = b"x" * 600  # above GZipMiddleware's minimum_size: the body is compressed


def gzip_app(engine: Engine | AsyncEngine, registry: CollectorRegistry, *, inside: bool) -> Any:
    """``POST /export/{i}`` writes ``endpoint-i``; its stream writes ``early-i`` before its
    first chunk and ``late-i`` after it."""
    app = FastAPI()
    if isinstance(engine, AsyncEngine):

        @app.post("/export/{i}")
        async def export_async(request: Request, i: int) -> StreamingResponse:
            db: AsyncSession = request.state.db
            await db.execute(items.insert().values(name=f"endpoint-{i}"))

            async def body() -> AsyncIterator[bytes]:
                await db.execute(items.insert().values(name=f"early-{i}"))
                yield CHUNK
                await db.execute(items.insert().values(name=f"late-{i}"))
                yield CHUNK

            return StreamingResponse(body())

    else:

        @app.post("/export/{i}")
        def export_sync(request: Request, i: int) -> StreamingResponse:
            db: Session = request.state.db
            db.execute(items.insert().values(name=f"endpoint-{i}"))

            def body() -> Iterator[bytes]:
                db.execute(items.insert().values(name=f"early-{i}"))
                yield CHUNK
                db.execute(items.insert().values(name=f"late-{i}"))
                yield CHUNK

            return StreamingResponse(body())

    # add_middleware wraps what was added before: the last one added is the outermost.
    if inside:
        app.add_middleware(GZipMiddleware)
        app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)
    else:
        app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)
        app.add_middleware(GZipMiddleware)
    return app


def test_a_middleware_holding_the_response_start_inside_is_reported_when_the_stack_is_built(
    tmp_path: Any,
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'order.db'}")
    try:
        with pytest.warns(MiddlewareOrderWarning, match=r"GZipMiddleware.*add_middleware"):
            gzip_app(engine, CollectorRegistry(), inside=True).build_middleware_stack()
        with warnings.catch_warnings():
            warnings.simplefilter("error", MiddlewareOrderWarning)
            gzip_app(engine, CollectorRegistry(), inside=False).build_middleware_stack()
    finally:
        engine.dispose()


@pytest.mark.parametrize("inside", [False, True], ids=["gzip-outside", "gzip-inside"])
@pytest.mark.parametrize("kind", KINDS)
async def test_gzip_outside_decides_at_the_apps_start_and_inside_at_the_first_chunk(
    kind: str, inside: bool, pg_url: str, check: Engine, app_name: str
) -> None:
    engine = pg_engine(pg_url, async_=kind == "pg-async", application_name=app_name)
    registry = CollectorRegistry()
    client = Client(gzip_app(engine, registry, inside=inside))
    try:
        with warnings.catch_warnings():  # the stack is built at the first request
            warnings.simplefilter("ignore", MiddlewareOrderWarning)
            outcome = await client.call(
                "/export/0", method="POST", headers=[(b"accept-encoding", b"gzip")]
            )
        assert outcome.error is None, outcome.error
        assert outcome.status == 200
        assert outcome.headers["content-encoding"] == "gzip"
        assert gzip.decompress(outcome.body) == CHUNK * 2
        # Outside, the stream's first write comes after the decision, rolled back like any
        # late write; inside, the decision waits for the first chunk and commits it.
        expected = {"endpoint-0", "early-0"} if inside else {"endpoint-0"}
        assert names(check) == expected
        assert checkedout(engine) == 0
        assert await wait_until_quiet(check, app_name) == 0
    finally:
        with anyio.CancelScope(shield=True):
            await dispose(engine)
