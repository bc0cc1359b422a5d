"""Configuration errors fail at construction (or when the stack is built) with a clear message."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

from sessionscope import ConfigurationError, DBSessionMiddleware
from sessionscope.fastapi import DBSession

from .support import http_scope, request


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body"})


def in_memory_engine() -> sa.Engine:
    """An in-memory SQLite engine set up as FastAPI's docs do: one connection, any thread."""
    return sa.create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )


@pytest.fixture
def engine() -> Any:
    engine = in_memory_engine()
    yield engine
    engine.dispose()


def make(**kwargs: Any) -> DBSessionMiddleware:
    kwargs.setdefault("registry", CollectorRegistry())
    return DBSessionMiddleware(app, **kwargs)


def test_no_engine_and_no_sessionmaker_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="needs a database: pass engine="):
        make()


def test_an_engine_and_a_sessionmaker_together_are_refused(engine: Any) -> None:
    with pytest.raises(ConfigurationError, match="got engine and sessionmaker; pass exactly one"):
        make(engine=engine, sessionmaker=sessionmaker(engine))


def test_something_that_is_not_an_engine_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be a sqlalchemy Engine or AsyncEngine"):
        make(engine="sqlite://")


def test_an_async_sessionmaker_passed_as_sessionmaker_is_refused() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match="pass it as async_sessionmaker="):
        make(sessionmaker=async_sessionmaker(engine))


def test_a_sync_sessionmaker_passed_as_async_sessionmaker_is_refused(engine: Any) -> None:
    with pytest.raises(ConfigurationError, match="goes in sessionmaker="):
        make(async_sessionmaker=sessionmaker(engine))


def test_a_commit_on_that_is_not_callable_is_refused(engine: Any) -> None:
    with pytest.raises(ConfigurationError, match="commit_on must be a function"):
        make(engine=engine, commit_on=400)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("exclude_paths", "/metrics", "not a single string"),
        ("exclude_paths", ["metrics"], "starting with '/'"),
        ("state_key", "my-db", "state_key must be a Python identifier"),
        ("leak_threshold", 0, "leak_threshold must be a positive number"),
        ("closed_log_level", "verbose", "closed_log_level must be one of"),
        ("max_routes", 0, "max_routes must be a positive integer"),
        ("leak_exempt_routes", "/export", "not a single string"),
    ],
)
def test_invalid_options_are_refused_with_what_to_do(
    engine: Any, option: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(engine=engine, **{option: value})


@pytest.mark.parametrize("same", ["state_key", "name"])
def test_adding_the_middleware_twice_with_the_same_key_or_name_is_refused(
    engine: Any, same: str
) -> None:
    fastapi_app = FastAPI()
    registry = CollectorRegistry()
    other = {"name": "other", "state_key": "other_db"}
    other.pop(same)
    fastapi_app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)
    fastapi_app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry, **other)
    with pytest.raises(ConfigurationError, match=f"added twice with {same}="):
        fastapi_app.build_middleware_stack()


@pytest.mark.anyio
async def test_a_state_key_taken_by_the_lifespan_state_is_a_clear_error(engine: Any) -> None:
    scope = http_scope()
    scope["state"] = {"db": "something from the lifespan"}
    with pytest.raises(ConfigurationError, match=r"request.state.db is already taken"):
        await request(make(engine=engine), scope=scope)


@pytest.mark.parametrize("same", ["state_key", "name"])
def test_a_mounted_app_with_its_own_middleware_on_the_same_key_is_refused_at_build(
    engine: Any, same: str
) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    other = {"name": "other", "state_key": "other_db"}
    other.pop(same)
    sub = Starlette()
    sub.add_middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry(), **other)
    outer = Starlette(routes=[Mount("/v2", app=sub)])
    outer.add_middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry())
    with pytest.raises(ConfigurationError, match=f"added twice with {same}=.*mounted"):
        outer.build_middleware_stack()


@pytest.mark.anyio
async def test_a_mounted_middleware_the_build_cannot_see_fails_its_first_request_clearly(
    engine: Any,
) -> None:
    """Behind an ASGI callable that hides it, the duplicate is found at the first request."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    sub = make(engine=engine)

    async def hidden(scope: Any, receive: Any, send: Any) -> None:
        await sub(scope, receive, send)

    outer = Starlette(routes=[Mount("/v2", app=hidden)])
    outer.add_middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry())
    with pytest.raises(ConfigurationError, match=r"request.state.db is already taken.*mounted"):
        await request(outer, "/v2/x")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
@pytest.mark.parametrize("given_as", ["engine", "sessionmaker", "replica_engine"])
def test_an_in_memory_sqlite_engine_with_a_connection_per_thread_is_refused_with_the_fix(
    url: str, given_as: str
) -> None:
    per_thread = sa.create_engine(url)  # SQLAlchemy's default for it: SingletonThreadPool
    options: dict[str, Any] = {
        "engine": {"engine": per_thread},
        "sessionmaker": {"sessionmaker": sessionmaker(per_thread)},
        "replica_engine": {"engine": in_memory_engine(), "replica_engine": per_thread},
    }[given_as]
    with pytest.raises(ConfigurationError) as refused:
        make(**options)
    message = str(refused.value)
    assert "SingletonThreadPool" in message
    assert 'create_engine("sqlite://", poolclass=StaticPool, ' in message
    assert 'connect_args={"check_same_thread": False})' in message
    per_thread.dispose()


@pytest.mark.anyio
async def test_the_in_memory_sqlite_setup_the_error_names_serves_def_routes() -> None:
    engine = in_memory_engine()
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE notes (text TEXT)"))
    fastapi_app = FastAPI()
    fastapi_app.add_middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry())

    @fastapi_app.post("/notes", status_code=201)
    def add(text: str, db: DBSession) -> dict[str, int]:
        db.execute(sa.text("INSERT INTO notes VALUES (:text)"), {"text": text})
        return {"notes": db.scalar(sa.text("SELECT count(*) FROM notes")) or 0}

    @fastapi_app.get("/notes")
    def count(db: DBSession) -> dict[str, int]:
        return {"notes": db.scalar(sa.text("SELECT count(*) FROM notes")) or 0}

    transport = httpx.ASGITransport(app=fastapi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        added = await client.post("/notes", params={"text": "hello"})
        counted = await client.get("/notes")
    assert (added.status_code, added.json()) == (201, {"notes": 1})
    assert (counted.status_code, counted.json()) == (200, {"notes": 1})
    engine.dispose()
