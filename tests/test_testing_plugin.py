"""The pytest plugin (``sessionscope.testing``), run on an example project with ``pytester``.

The example project is a FastAPI application with a ``DBSessionMiddleware``; its tests use
the plugin's fixtures the way a user's would. Each inner run must pass, and afterwards the real
database must hold none of the rows those tests wrote, committed or not.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import sessionmaker
from starlette.applications import Starlette
from starlette.routing import Mount

from sessionscope import ConfigurationError, DBSessionMiddleware
from sessionscope.testing import (
    async_rollback_connection,
    bind_app,
    capture_session_events,
    find_middlewares,
    rollback_connection,
)

from .support import Backend, items, request

pytest_plugins = ["pytester"]

URL_ENV = "SESSIONSCOPE_EXAMPLE_DATABASE_URL"

EXAMPLE_APP = f"""
import os

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import create_async_engine

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import AsyncDBSession, DBSession

URL = os.environ["{URL_ENV}"]
IS_ASYNC = "+aiosqlite" in URL or "+asyncpg" in URL

metadata = sa.MetaData()
items = sa.Table(
    "ss_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
)
engine = create_async_engine(URL) if IS_ASYNC else sa.create_engine(URL)
NAMES = sa.select(items.c.name).order_by(items.c.name)


def make_app(registry=None):
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)

    if IS_ASYNC:

        @app.post("/items/{{name}}", status_code=201)
        async def create(name: str, db: AsyncDBSession):
            await db.execute(items.insert().values(name=name))
            return {{"name": name}}

        @app.post("/items/{{name}}/conflict")
        async def conflict(name: str, db: AsyncDBSession):
            await db.execute(items.insert().values(name=name))
            return JSONResponse({{"detail": "conflict"}}, status_code=409)

        @app.post("/items/{{name}}/commit-then-fail")
        async def commit_then_fail(name: str, db: AsyncDBSession):
            await db.execute(items.insert().values(name=name))
            await db.commit()
            raise HTTPException(400, "failed after committing")

        @app.get("/items")
        async def names(db: AsyncDBSession):
            return list((await db.execute(NAMES)).scalars())

    else:

        @app.post("/items/{{name}}", status_code=201)
        def create(name: str, db: DBSession):
            db.execute(items.insert().values(name=name))
            return {{"name": name}}

        @app.post("/items/{{name}}/conflict")
        def conflict(name: str, db: DBSession):
            db.execute(items.insert().values(name=name))
            return JSONResponse({{"detail": "conflict"}}, status_code=409)

        @app.post("/items/{{name}}/commit-then-fail")
        def commit_then_fail(name: str, db: DBSession):
            db.execute(items.insert().values(name=name))
            db.commit()
            raise HTTPException(400, "failed after committing")

        @app.get("/items")
        def names(db: DBSession):
            return list(db.execute(NAMES).scalars())

    return app


app = make_app()
"""

EXAMPLE_CONFTEST = """
import pytest

from app import app, engine


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def sessionscope_engine():
    return engine


@pytest.fixture
def sessionscope_app():
    return app


def pytest_sessionfinish(session):
    if isinstance(engine, sa.engine.Engine):
        engine.dispose()


import sqlalchemy as sa  # noqa: E402
"""

EXAMPLE_SYNC_TESTS = """
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from sessionscope.testing import bind_app

from app import NAMES, items, make_app


def test_an_item_the_app_creates_is_visible_to_the_test(
    sessionscope_bound_app, sessionscope_session
):
    client = TestClient(sessionscope_bound_app)
    assert client.post("/items/a").status_code == 201
    assert client.get("/items").json() == ["a"]
    assert list(sessionscope_session.scalars(NAMES)) == ["a"]


def test_the_previous_tests_rows_are_gone(sessionscope_bound_app, sessionscope_session):
    assert TestClient(sessionscope_bound_app).get("/items").json() == []
    assert list(sessionscope_session.scalars(NAMES)) == []


def test_a_4xx_response_still_rolls_back_its_own_writes(sessionscope_bound_app):
    client = TestClient(sessionscope_bound_app)
    assert client.post("/items/kept").status_code == 201
    assert client.post("/items/lost/conflict").status_code == 409
    assert client.get("/items").json() == ["kept"]


def test_the_apps_own_commit_survives_its_later_error_response(sessionscope_bound_app):
    client = TestClient(sessionscope_bound_app)
    assert client.post("/items/early/commit-then-fail").status_code == 400
    assert client.get("/items").json() == ["early"]


def test_rows_the_test_commits_are_seen_by_the_app(sessionscope_bound_app, sessionscope_session):
    sessionscope_session.execute(items.insert().values(name="seeded"))
    sessionscope_session.commit()
    assert TestClient(sessionscope_bound_app).get("/items").json() == ["seeded"]


def test_session_events_are_captured(sessionscope_bound_app, sessionscope_events):
    TestClient(sessionscope_bound_app).post("/items/x")
    closed = [e for e in sessionscope_events if e["event"] == "db_session.closed"]
    assert [e["outcome"] for e in closed] == ["commit"]
    assert all(e["event"].startswith("db_session.") for e in sessionscope_events)


def test_metrics_land_in_the_tests_own_registry(sessionscope_connection, sessionscope_registry):
    assert isinstance(sessionscope_registry, CollectorRegistry)
    app = make_app(registry=sessionscope_registry)
    with bind_app(app, sessionscope_connection):
        assert TestClient(app).post("/items/counted").status_code == 201
    labels = {"db": "default", "route": "/items/{name}", "outcome": "commit"}
    assert sessionscope_registry.get_sample_value("db_sessions_closed_total", labels) == 1
"""

EXAMPLE_ASYNC_TESTS = """
import httpx
import pytest

from app import NAMES, items

pytestmark = pytest.mark.anyio


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_an_item_the_app_creates_is_visible_to_the_test(
    sessionscope_async_bound_app, sessionscope_async_session
):
    async with client(sessionscope_async_bound_app) as c:
        assert (await c.post("/items/a")).status_code == 201
        assert (await c.get("/items")).json() == ["a"]
    assert list(await sessionscope_async_session.scalars(NAMES)) == ["a"]


async def test_the_previous_tests_rows_are_gone(
    sessionscope_async_bound_app, sessionscope_async_session
):
    async with client(sessionscope_async_bound_app) as c:
        assert (await c.get("/items")).json() == []
    assert list(await sessionscope_async_session.scalars(NAMES)) == []


async def test_a_4xx_response_still_rolls_back_its_own_writes(sessionscope_async_bound_app):
    async with client(sessionscope_async_bound_app) as c:
        assert (await c.post("/items/kept")).status_code == 201
        assert (await c.post("/items/lost/conflict")).status_code == 409
        assert (await c.get("/items")).json() == ["kept"]


async def test_the_apps_own_commit_survives_its_later_error_response(
    sessionscope_async_bound_app,
):
    async with client(sessionscope_async_bound_app) as c:
        assert (await c.post("/items/early/commit-then-fail")).status_code == 400
        assert (await c.get("/items")).json() == ["early"]


async def test_rows_the_test_commits_are_seen_by_the_app(
    sessionscope_async_bound_app, sessionscope_async_session
):
    await sessionscope_async_session.execute(items.insert().values(name="seeded"))
    await sessionscope_async_session.commit()
    async with client(sessionscope_async_bound_app) as c:
        assert (await c.get("/items")).json() == ["seeded"]


async def test_session_events_are_captured(sessionscope_async_bound_app, sessionscope_events):
    async with client(sessionscope_async_bound_app) as c:
        await c.post("/items/x")
    closed = [e for e in sessionscope_events if e["event"] == "db_session.closed"]
    assert [e["outcome"] for e in closed] == ["commit"]
"""

EXAMPLE_INI = """
[pytest]
addopts = -p sessionscope.testing -p anyio.pytest_plugin
filterwarnings =
    error::sqlalchemy.exc.SAWarning
    error::pytest.PytestUnraisableExceptionWarning
"""

SYNC_TEST_COUNT = 7
ASYNC_TEST_COUNT = 6


def _url(backend: Backend) -> str:
    return backend.engine.url.render_as_string(hide_password=False)


def _run_example(pytester: pytest.Pytester, backend: Backend) -> pytest.RunResult:
    pytester.makefile(".ini", pytest=EXAMPLE_INI)
    pytester.makepyfile(app=EXAMPLE_APP, conftest=EXAMPLE_CONFTEST)
    if backend.is_async:
        pytester.makepyfile(test_example=EXAMPLE_ASYNC_TESTS)
    else:
        pytester.makepyfile(test_example=EXAMPLE_SYNC_TESTS)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


@pytest.fixture
def example_env(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Backend:
    # The inner run loads its plugins explicitly (-p), with or without the entry point.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv(URL_ENV, _url(backend))
    return backend


@pytest.mark.anyio
async def test_a_users_app_tests_run_in_transactions_that_leave_the_database_untouched(
    example_env: Backend, pytester: pytest.Pytester
) -> None:
    backend = example_env
    result = await anyio.to_thread.run_sync(_run_example, pytester, backend)
    expected = ASYNC_TEST_COUNT if backend.is_async else SYNC_TEST_COUNT
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=expected)
    assert backend.names() == []


def test_fixtures_that_need_the_users_engine_explain_how_to_provide_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(
        test_missing="""
        def test_uses_the_session(sessionscope_session):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "sessionscope.testing", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*override the `sessionscope_engine` fixture in conftest.py*"])


def test_the_plugin_is_registered_as_the_pytest11_entry_point_sessionscope() -> None:
    found = [ep for ep in entry_points(group="pytest11") if ep.value == "sessionscope.testing"]
    assert [ep.name for ep in found] == ["sessionscope"], (
        "the pytest11 entry point is not installed: it is declared in pyproject.toml; "
        "reinstall the package (pip install -e .)"
    )


AUTOLOADED_TESTS = """
import sqlalchemy as sa
import pytest
from prometheus_client import CollectorRegistry

import sessionscope.testing

metadata = sa.MetaData()
items = sa.Table("items", metadata, sa.Column("name", sa.String(50), primary_key=True))


@pytest.fixture(scope="module")
def sessionscope_engine(tmp_path_factory):
    engine = sa.create_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'app.db'}")
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_the_plugin_was_loaded_by_its_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.get_plugin("sessionscope") is sessionscope.testing


def test_a_commit_in_the_tests_transaction_is_seen_inside_it(sessionscope_session):
    sessionscope_session.execute(items.insert().values(name="a"))
    sessionscope_session.commit()
    assert sessionscope_session.scalars(sa.select(items.c.name)).all() == ["a"]


def test_the_previous_tests_commit_was_rolled_back(sessionscope_session, sessionscope_engine):
    assert sessionscope_session.scalars(sa.select(items.c.name)).all() == []
    with sessionscope_engine.connect() as conn:
        assert conn.scalars(sa.select(items.c.name)).all() == []


def test_the_registry_fixture_is_a_fresh_registry(sessionscope_registry):
    assert isinstance(sessionscope_registry, CollectorRegistry)
    assert list(sessionscope_registry.collect()) == []
"""


def test_an_installed_package_gives_its_fixtures_to_pytest_without_any_option(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No -p option, plugin autoloading on: pytest loads sessionscope.testing by itself.
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    pytester.makepyfile(test_autoloaded=AUTOLOADED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=4)
    fixtures = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures")
    fixtures.stdout.fnmatch_lines(["*sessionscope_bound_app*", "*sessionscope_async_session*"])


# -- the helpers, in process -----------------------------------------------------------------


def _plain_app(backend: Backend, seen: list[Any]) -> DBSessionMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        seen.append(session)
        await backend.insert(session, scope["path"].strip("/"))
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body"})

    return DBSessionMiddleware(app, engine=backend.engine)


@pytest.mark.anyio
async def test_bind_app_joins_the_test_transaction_and_restores_the_sessionmaker(
    backend: Backend,
) -> None:
    seen: list[Any] = []
    mw = _plain_app(backend, seen)
    before = dict(mw.settings.source.factory.kw)
    if isinstance(backend.engine, AsyncEngine):
        async with async_rollback_connection(backend.engine) as aconn:
            with bind_app(mw, aconn) as bound:
                assert bound == [mw]
                assert (await request(mw, "/inside")).status == 201
            rows = (await aconn.execute(sa.select(items.c.name))).scalars().all()
    else:
        with rollback_connection(backend.engine) as conn:
            with bind_app(mw, conn) as bound:
                assert bound == [mw]
                assert (await request(mw, "/inside")).status == 201
            rows = conn.execute(sa.select(items.c.name)).scalars().all()
    assert rows == ["inside"]
    assert backend.names() == []
    assert mw.settings.source.factory.kw == before
    assert (await request(mw, "/outside")).status == 201
    assert backend.names() == ["outside"]


def test_find_middlewares_follows_the_starlette_stack_and_mounted_apps(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        inner = Starlette()
        inner.add_middleware(DBSessionMiddleware, engine=engine, name="inner", state_key="i")
        outer = Starlette(routes=[Mount("/sub", app=inner)])
        outer.add_middleware(DBSessionMiddleware, engine=engine)
        found = find_middlewares(outer)
        assert [mw.name for mw in found] == ["default", "inner"]
    finally:
        engine.dispose()


def test_bind_app_refuses_an_app_without_a_matching_middleware(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    other = sa.create_engine(f"sqlite:///{tmp_path / 'y.db'}")
    try:
        app = Starlette()
        app.add_middleware(DBSessionMiddleware, sessionmaker=sessionmaker(engine))
        with (
            rollback_connection(other) as conn,
            pytest.raises(ConfigurationError, match="no DBSessionMiddleware on"),
            bind_app(app, conn),
        ):
            pass
        with rollback_connection(engine) as conn, bind_app(app, conn) as bound:
            assert [mw.name for mw in bound] == ["default"]
    finally:
        engine.dispose()
        other.dispose()


@pytest.mark.anyio
async def test_bind_app_refuses_a_connection_of_the_other_kind(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    try:
        sync_mw = DBSessionMiddleware(app, engine=engine)
        async_mw = DBSessionMiddleware(app, engine=aengine)
        with (
            rollback_connection(engine) as conn,
            pytest.raises(ConfigurationError, match="makes async sessions"),
            bind_app(async_mw, conn, name="default"),
        ):
            pass
        async with async_rollback_connection(aengine) as aconn:
            with (
                pytest.raises(ConfigurationError, match="makes sync sessions"),
                bind_app(sync_mw, aconn, name="default"),
            ):
                pass
    finally:
        engine.dispose()
        await aengine.dispose()


@pytest.mark.anyio
async def test_capture_session_events_keeps_only_request_session_events(
    backend: Backend,
) -> None:
    import structlog

    mw = _plain_app(backend, [])
    with capture_session_events() as events:
        structlog.get_logger("app").info("unrelated")
        await request(mw, "/x")
    assert [e["event"] for e in events] == ["db_session.closed"]
    assert events[0]["outcome"] == "commit"


@pytest.mark.anyio
async def test_rollback_connection_and_its_async_twin_refuse_the_wrong_engine(
    tmp_path: Any,
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        with (
            pytest.raises(ConfigurationError, match="async_rollback_connection"),
            rollback_connection(aengine),  # type: ignore[arg-type]
        ):
            pass
        with pytest.raises(ConfigurationError, match="use `with rollback_connection"):
            async with async_rollback_connection(engine):  # type: ignore[arg-type]
                pass
    finally:
        engine.dispose()
        await aengine.dispose()
