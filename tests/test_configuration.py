"""Configuration errors fail at construction (or when the stack is built) with a clear message."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from sessionscope import ConfigurationError, DBSessionMiddleware

from .support import http_scope, request


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body"})


@pytest.fixture
def engine() -> Any:
    engine = sa.create_engine("sqlite://")
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
