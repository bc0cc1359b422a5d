"""Clients that go away at every phase of a request, on PostgreSQL (psycopg and asyncpg).

A server tells the application a client left in one of three ways: ``receive()`` returns
``http.disconnect``, ``send()`` raises ``OSError`` (ASGI spec 2.4), or the server cancels the
application's task. The harness below does each, at the moment the test chooses (decided by
events: the query is seen running on the server, the commit is on the wire, a chunk was sent).

Whatever the phase: work not committed before the disconnect is rolled back, work committed
before it stays committed, the connection is back in the pool, and no server backend of the
application is left ``idle in transaction``.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware

from ..support import http_scope, items
from .helpers import (
    checkedout,
    dispose,
    pg_engine,
    sample,
    sync_engine_of,
    wait_for_statement,
    wait_until_quiet,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KINDS = ["pg-sync", "pg-async"]
SLOW_QUERY = 1.0


class Connection:
    """One client connection as a server presents it to the application."""

    def __init__(self, *, gone_at_start: bool = False, spec_version: str = "2.4") -> None:
        self.messages: list[dict[str, Any]] = []
        self.gone = anyio.Event()
        self.spec_version = spec_version
        self.error: BaseException | None = None
        self.first_chunk = anyio.Event()
        self.body_sent = gone_at_start
        if gone_at_start:
            self.gone.set()

    def scope(self, path: str) -> dict[str, Any]:
        scope = http_scope(path, "POST")
        scope["asgi"]["spec_version"] = self.spec_version
        return scope

    async def receive(self) -> dict[str, Any]:
        if not self.body_sent:
            self.body_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()  # a real send yields to the loop (and can be cancelled)
        if self.gone.is_set() and self.spec_version >= "2.4":
            raise OSError("client disconnected")
        self.messages.append(message)
        if message["type"] == "http.response.body" and message.get("more_body"):
            self.first_chunk.set()

    async def serve(self, app: Any, path: str) -> None:
        try:
            await app(self.scope(path), self.receive, self.send)
        except Exception as exc:  # what the server logs; the client is gone anyway
            self.error = exc


def app_with(engine: Engine | AsyncEngine, route: Route, registry: CollectorRegistry) -> Starlette:
    return Starlette(
        routes=[route],
        middleware=[Middleware(DBSessionMiddleware, engine=engine, registry=registry)],
    )


async def execute(session: Session | AsyncSession, statement: Any, **params: Any) -> Any:
    if isinstance(session, AsyncSession):
        return await session.execute(statement, params)
    return await anyio.to_thread.run_sync(lambda: session.execute(statement, params))


def names(check: Engine) -> set[str]:
    with check.connect() as conn:
        return set(conn.execute(sa.select(items.c.name)).scalars())


async def assert_nothing_left(
    engine: Engine | AsyncEngine, check: Engine, app_name: str, registry: CollectorRegistry
) -> None:
    assert checkedout(engine) == 0
    assert await wait_until_quiet(check, app_name, within=SLOW_QUERY + 5) == 0
    assert sample(registry, "db_sessions_open") == 0


@pytest.fixture(params=KINDS)
async def engine(
    request: pytest.FixtureRequest, pg_url: str, check: Engine, app_name: str
) -> AsyncIterator[Engine | AsyncEngine]:
    built = pg_engine(
        pg_url, async_=request.param == "pg-async", application_name=app_name, pool_size=2
    )
    try:
        yield built
    finally:
        await dispose(built)


async def test_disconnect_before_the_body_is_read_rolls_back_the_writes_made_so_far(
    engine: Engine | AsyncEngine, check: Engine, app_name: str
) -> None:
    async def endpoint(request: Request) -> Response:
        await execute(request.state.db, items.insert().values(name="audit-before-body"))
        await request.body()  # the client is already gone: ClientDisconnect
        return JSONResponse({}, status_code=201)

    registry = CollectorRegistry()
    conn = Connection(gone_at_start=True)
    await conn.serve(app_with(engine, Route("/w", endpoint, methods=["POST"]), registry), "/w")
    # ClientDisconnect, or the OSError of Starlette's 500 sent to the gone client
    assert isinstance(conn.error, ClientDisconnect | OSError)
    assert names(check) == set()
    await assert_nothing_left(engine, check, app_name, registry)


async def test_disconnect_during_a_slow_query_rolls_back_and_frees_the_connection(
    engine: Engine | AsyncEngine, check: Engine, app_name: str
) -> None:
    """The server cancels the application while ``pg_sleep`` runs on the database."""

    async def endpoint(request: Request) -> Response:
        session = request.state.db
        await execute(session, items.insert().values(name="during-query"))
        await execute(session, sa.text("select pg_sleep(:s)"), s=SLOW_QUERY)
        return JSONResponse({}, status_code=201)

    registry = CollectorRegistry()
    app = app_with(engine, Route("/w", endpoint, methods=["POST"]), registry)
    conn = Connection()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.serve, app, "/w")
            await wait_for_statement(check, app_name, "pg_sleep")
            conn.gone.set()
            tg.cancel_scope.cancel()
    assert conn.messages == []
    assert names(check) == set()
    await assert_nothing_left(engine, check, app_name, registry)
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [(e["outcome"], e["reason"]) for e in closed] == [("rollback", "cancelled")]


@pytest.mark.parametrize("how", ["send-raises", "server-cancels"])
async def test_disconnect_during_a_streaming_body_keeps_the_commit_and_drops_late_writes(
    engine: Engine | AsyncEngine, check: Engine, app_name: str, how: str
) -> None:
    async def endpoint(request: Request) -> Response:
        session = request.state.db
        await execute(session, items.insert().values(name="committed-at-start"))

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first,"
            # background-ish work while streaming: written after the decision, never committed
            await execute(session, items.insert().values(name="late-write"))
            for _ in range(100):
                await execute(session, sa.text("select 1"))
                yield b"more,"

        return StreamingResponse(chunks(), status_code=200)

    registry = CollectorRegistry()
    app = app_with(engine, Route("/w", endpoint, methods=["POST"]), registry)
    conn = Connection()
    async with anyio.create_task_group() as tg:
        tg.start_soon(conn.serve, app, "/w")
        await conn.first_chunk.wait()
        conn.gone.set()
        if how == "server-cancels":
            tg.cancel_scope.cancel()
    assert conn.messages[0]["status"] == 200
    assert names(check) == {"committed-at-start"}
    await assert_nothing_left(engine, check, app_name, registry)


async def test_disconnect_while_the_commit_is_in_flight_keeps_the_commit(
    engine: Engine | AsyncEngine, check: Engine, app_name: str
) -> None:
    """The server cancels the application at the moment COMMIT is sent: the commit is
    shielded, so it completes; the write is in the database; nothing is left open."""

    async def endpoint(request: Request) -> Response:
        await execute(request.state.db, items.insert().values(name="committed"))
        return JSONResponse({}, status_code=201)

    registry = CollectorRegistry()
    app = app_with(engine, Route("/w", endpoint, methods=["POST"]), registry)
    conn = Connection()
    loop_thread = threading.current_thread()
    cancel: list[Callable[[], None]] = []

    def on_commit(connection: Any) -> None:
        if threading.current_thread() is loop_thread:
            cancel[0]()
        else:
            anyio.from_thread.run_sync(cancel[0])

    event.listen(sync_engine_of(engine), "commit", on_commit)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:

            def disconnect() -> None:
                conn.gone.set()
                tg.cancel_scope.cancel()

            cancel.append(disconnect)
            tg.start_soon(conn.serve, app, "/w")
    event.remove(sync_engine_of(engine), "commit", on_commit)
    assert conn.gone.is_set()
    assert names(check) == {"committed"}
    await assert_nothing_left(engine, check, app_name, registry)
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [e["outcome"] for e in closed] == ["commit"]


async def test_a_request_cancelled_before_its_response_started_never_commits(
    engine: Engine | AsyncEngine, check: Engine, app_name: str
) -> None:
    """The server cancels the application while it waits on work it cannot abandon (a worker
    thread); that work returns, the application sends ``201`` with the cancellation pending.
    The request was cancelled before any decision: it must roll back, not commit."""
    release = threading.Event()
    waiting = anyio.Event()

    def blocking_step() -> None:
        anyio.from_thread.run_sync(waiting.set)
        release.wait(10)

    async def endpoint(request: Request) -> Response:
        await execute(request.state.db, items.insert().values(name="cancelled-before-start"))
        await anyio.to_thread.run_sync(blocking_step)  # not abandoned on cancellation
        return JSONResponse({}, status_code=201)

    registry = CollectorRegistry()
    app = app_with(engine, Route("/w", endpoint, methods=["POST"]), registry)
    conn = Connection()
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.serve, app, "/w")
            await waiting.wait()
            conn.gone.set()
            tg.cancel_scope.cancel()
            release.set()
    assert conn.messages == []
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert names(check) == set(), f"committed after cancellation: {closed}"
    await assert_nothing_left(engine, check, app_name, registry)
    assert [(e["outcome"], e["reason"]) for e in closed] == [("rollback", "cancelled")]
