"""``database_lifespan``: fail fast at startup, dispose engines at shutdown.

The ASGI lifespan protocol is driven by a small harness (and once by Starlette's TestClient);
unreachable servers are a port on 127.0.0.1 that nobody listens on, and a listener that never
answers. On the live PostgreSQL server (SESSIONSCOPE_TEST_POSTGRES_URL), a wrong database name
and a wrong user are refused at startup, in process and by a real uvicorn.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import ConfigurationError, DBSessionMiddleware
from sessionscope.lifespan import (
    DatabaseUnavailableError,
    check_databases,
    database_lifespan,
    dispose_engines,
)

from .support import Backend, driver_url, http_scope, postgres_url, request

pytestmark = pytest.mark.anyio

PASSWORD = "s3cret-Pa55word"


class LifespanRun:
    """Drives one ASGI lifespan: startup, then shutdown when told; records what the app sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sent: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}
        self.error: BaseException | None = None
        self._shutdown = anyio.Event()
        self._started = anyio.Event()
        self._done = anyio.Event()

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    async def _run(self) -> None:
        messages = iter([{"type": "lifespan.startup"}])

        async def receive() -> dict[str, Any]:
            message = next(messages, None)
            if message is not None:
                return message
            await self._shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)
            if message["type"].startswith("lifespan.startup."):
                self._started.set()

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": self.state}
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.error = exc
        finally:
            self._started.set()
            self._done.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[LifespanRun]:
        async with anyio.create_task_group() as group:
            group.start_soon(self._run)
            with anyio.fail_after(30):
                await self._started.wait()
            try:
                yield self
            finally:
                self._shutdown.set()
                with anyio.fail_after(30):
                    await self._done.wait()


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def unreachable_engine(kind: str, port: int) -> Engine | AsyncEngine:
    url = f"postgresql+{{driver}}://app_user:{PASSWORD}@127.0.0.1:{port}/orders"
    if kind == "async":
        return create_async_engine(url.format(driver="asyncpg"))
    return sa.create_engine(url.format(driver="psycopg"))


async def dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


def ok_app(lifespan: Any, engine: Engine | AsyncEngine | None = None) -> Starlette:
    async def home(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.state._state))

    app = Starlette(routes=[Route("/", home)], lifespan=lifespan)
    if engine is not None:
        app.add_middleware(DBSessionMiddleware, engine=engine)
    return app


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_startup_fails_naming_the_database_host_and_name_but_never_the_password(
    kind: str,
) -> None:
    port = free_port()
    engine = unreachable_engine(kind, port)
    try:
        run = LifespanRun(ok_app(database_lifespan(engine)))
        async with run.running():
            pass
        assert run.types == ["lifespan.startup.failed"]
        assert isinstance(run.error, DatabaseUnavailableError)
        message = str(run.error)
        assert f"database 'orders' at 127.0.0.1:{port} (user 'app_user')" in message
        assert "Check the database URL" in message
        everything = run.sent[0]["message"] + "".join(traceback.format_exception(run.error))
        assert PASSWORD not in everything
        assert f"127.0.0.1:{port}" in run.sent[0]["message"]
    finally:
        await dispose(engine)


WRONG_DATABASE = "ss_no_such_database"
WRONG_USER = "ss_no_such_user"


def wrong_url(kind: str, wrong: str) -> URL:
    """The live test server's URL with a wrong database or user, and a secret password."""
    base = postgres_url()
    assert base is not None
    url = make_url(driver_url(base, async_=kind == "async"))
    if wrong == "database":
        return url.set(database=WRONG_DATABASE, password=PASSWORD)
    return url.set(username=WRONG_USER, password=PASSWORD)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("wrong", "problem"),
    [
        ("database", f'database "{WRONG_DATABASE}" does not exist'),
        # Depending on the server's pg_hba.conf: no such role, or it cannot log in.
        (
            "user",
            f'(role "{WRONG_USER}" does not exist'
            f'|password authentication failed for user "{WRONG_USER}")',
        ),
    ],
    ids=["wrong-database", "wrong-user"],
)
async def test_a_wrong_database_or_user_on_a_live_server_fails_startup_fast_and_says_why(
    kind: str,
    wrong: str,
    problem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = wrong_url(kind, wrong)
    rendered = url.render_as_string(hide_password=False)
    assert PASSWORD in rendered
    engine = create_async_engine(rendered) if kind == "async" else sa.create_engine(rendered)
    caplog.set_level(logging.DEBUG)
    try:
        run = LifespanRun(ok_app(database_lifespan(engine)))
        started = time.monotonic()
        with capture_logs() as events:
            async with run.running():
                pass
        assert time.monotonic() - started < 5  # at once, not after the 10 s check timeout
        assert run.types == ["lifespan.startup.failed"]
        assert isinstance(run.error, DatabaseUnavailableError)
        message = str(run.error)
        assert f"{url.drivername} database '{url.database}' at {url.host}" in message
        assert f"(user '{url.username}')" in message
        assert re.search(problem, message), message
        everything = [
            message,
            run.sent[0]["message"],
            *traceback.format_exception(run.error),
            caplog.text,
            *(repr(event) for event in events),
        ]
        assert not [text for text in everything if PASSWORD in text]
    finally:
        await dispose(engine)


UVICORN_APP = """
import os

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette

from sessionscope.lifespan import database_lifespan

URL = os.environ["APP_DATABASE_URL"]
engine = create_async_engine(URL) if "+asyncpg" in URL else sa.create_engine(URL)
app = Starlette(lifespan=database_lifespan(engine))
"""


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("kind", "wrong"), [("sync", "database"), ("async", "user")], ids=["sync-db", "async-user"]
)
def test_uvicorn_refuses_to_start_and_its_logs_name_the_problem_but_not_the_password(
    kind: str, wrong: str, tmp_path: Path
) -> None:
    url = wrong_url(kind, wrong)
    problem = (
        f'database "{WRONG_DATABASE}" does not exist' if wrong == "database" else f'"{WRONG_USER}"'
    )
    (tmp_path / "app.py").write_text(UVICORN_APP)
    env = {**os.environ, "APP_DATABASE_URL": url.render_as_string(hide_password=False)}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(tmp_path),
               "--host", "127.0.0.1", "--port", "0", "--lifespan", "on"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    logs = done.stdout + done.stderr
    assert done.returncode == 3, logs  # uvicorn's exit status for a failed startup
    assert "Application startup failed" in logs
    assert "DatabaseUnavailableError" in logs
    assert f"database '{url.database}'" in logs
    assert f"(user '{url.username}')" in logs
    assert problem in logs
    assert PASSWORD not in logs


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_server_that_never_answers_fails_the_startup_within_the_timeout(
    kind: str, silent_port: int
) -> None:
    engine = unreachable_engine(kind, silent_port)
    try:
        with anyio.fail_after(10):
            with pytest.raises(DatabaseUnavailableError) as raised:
                await check_databases(engine, timeout=0.5)
        assert "no answer within 0.5 s" in str(raised.value)
        assert PASSWORD not in str(raised.value)
    finally:
        await dispose(engine)


async def test_every_failing_database_is_named_and_reachable_ones_are_not(
    backend: Backend,
) -> None:
    port = free_port()
    broken = unreachable_engine("async", port)
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            await check_databases(backend.engine, broken)
        message = str(raised.value)
        assert message.startswith("sessionscope: 1 of 2 database(s) did not answer at startup")
        assert f"127.0.0.1:{port}" in message
        assert list(raised.value.causes) == [
            f"postgresql+asyncpg database 'orders' at 127.0.0.1:{port} (user 'app_user')"
        ]
    finally:
        await dispose(broken)


async def test_engines_are_disposed_at_shutdown(backend: Backend) -> None:
    app = ok_app(database_lifespan(backend.engine), backend.engine)
    old_pool: Any = backend.sync_engine.pool
    run = LifespanRun(app)
    async with run.running():
        assert run.types == ["lifespan.startup.complete"]
        assert old_pool.checkedin() == 1  # the startup check's connection, back in the pool
        assert (await request(app, "/")).status == 200
    assert run.types == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert run.error is None
    assert old_pool.checkedin() == 0
    assert backend.sync_engine.pool is not old_pool


async def test_the_users_lifespan_runs_between_the_check_and_the_disposal_and_its_state_reaches_requests(  # noqa: E501
    backend: Backend,
) -> None:
    steps: list[str] = []
    event.listen(backend.sync_engine, "engine_disposed", lambda engine: steps.append("disposed"))
    pool: Any = backend.sync_engine.pool

    @asynccontextmanager
    async def users_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        steps.append(f"user startup (checked: {pool.checkedin() == 1})")
        yield {"greeting": "hello"}
        steps.append("user shutdown")

    app = ok_app(database_lifespan(backend.engine, lifespan=users_lifespan))
    run = LifespanRun(app)
    async with run.running():
        response = await request(app, "/", scope=_http_scope_with(run.state))
        assert response.body == b'{"greeting":"hello"}'
    assert steps == ["user startup (checked: True)", "user shutdown", "disposed"]


async def test_a_failing_user_startup_still_disposes_the_engines(backend: Backend) -> None:
    disposed: list[str] = []
    event.listen(backend.sync_engine, "engine_disposed", lambda engine: disposed.append("x"))

    @asynccontextmanager
    async def users_lifespan(app: Any) -> AsyncIterator[None]:
        raise LookupError("cache unavailable")
        yield

    run = LifespanRun(ok_app(database_lifespan(backend.engine, lifespan=users_lifespan)))
    async with run.running():
        pass
    assert run.types == ["lifespan.startup.failed"]
    assert isinstance(run.error, LookupError)
    assert disposed == ["x"]


async def test_database_lifespan_nests_inside_the_users_own_lifespan(backend: Backend) -> None:
    old_pool: Any = backend.sync_engine.pool

    @asynccontextmanager
    async def users_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        async with database_lifespan(backend.engine)(app):
            yield {"greeting": "nested"}

    run = LifespanRun(ok_app(users_lifespan))
    async with run.running():
        assert run.types == ["lifespan.startup.complete"]
        assert old_pool.checkedin() == 1
    assert backend.sync_engine.pool is not old_pool


def test_works_with_starlette_testclient_as_a_context_manager(tmp_path: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this Starlette asks for httpx2 instead of httpx
        from starlette.testclient import TestClient

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    pool: Any = engine.pool
    try:
        app = ok_app(database_lifespan(engine), engine)
        with TestClient(app) as client:
            assert pool.checkedin() == 1
            assert client.get("/").status_code == 200
        assert engine.pool is not pool
        assert pool.checkedin() == 0
    finally:
        engine.dispose()


async def test_check_false_starts_without_touching_the_database() -> None:
    engine = unreachable_engine("sync", free_port())
    try:
        run = LifespanRun(ok_app(database_lifespan(engine, check=False)))
        async with run.running():
            assert run.types == ["lifespan.startup.complete"]
        assert run.error is None
    finally:
        await dispose(engine)


async def test_a_sqlite_file_that_cannot_be_opened_is_named(tmp_path: Any) -> None:
    path = tmp_path / "missing-dir" / "app.db"
    engines: list[Engine | AsyncEngine] = [
        sa.create_engine(f"sqlite:///{path}"),
        create_async_engine(f"sqlite+aiosqlite:///{path}"),
    ]
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            await check_databases(*engines)
        assert str(raised.value).count(str(path)) == 2
        assert "unable to open database file" in str(raised.value)
    finally:
        for engine in engines:
            await dispose(engine)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_an_error_that_is_not_the_databases_propagates_unchanged_instead_of_blaming_the_url(
    kind: str,
) -> None:
    """A bug (here a connect function that raises TypeError, as an incompatible dependency did)
    is not reported as an unreachable database with advice to check the URL and credentials."""

    def broken() -> Any:
        raise TypeError("a bug, not the database")

    async def broken_async() -> Any:
        broken()

    engine: Engine | AsyncEngine = (
        create_async_engine("sqlite+aiosqlite://", async_creator=broken_async)
        if kind == "async"
        else sa.create_engine("sqlite://", creator=broken)
    )
    try:
        with pytest.raises(TypeError, match="a bug, not the database"):
            await check_databases(engine)
    finally:
        await dispose(engine)


async def test_dispose_engines_is_safe_to_call_twice(backend: Backend) -> None:
    await dispose_engines(backend.engine)
    await dispose_engines(backend.engine)
    assert backend.checkedout() == 0


def test_misuse_is_a_configuration_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="at least one Engine"):
        database_lifespan()
    with pytest.raises(ConfigurationError, match="not sessionmaker"):
        database_lifespan(sa.orm.sessionmaker())  # type: ignore[arg-type]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError, match="timeout must be positive"):
        database_lifespan(engine, timeout=0)


def _http_scope_with(state: dict[str, Any]) -> dict[str, Any]:
    scope = http_scope("/")
    scope["state"] = dict(state)
    return scope
