"""FastAPI-level behaviour: dependencies, HTTPException, returned errors, background tasks."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware, SessionClosedError, SessionNotAvailableError
from sessionscope.fastapi import AsyncDBSession, DBSession, get_session

from .apps import items_app
from .support import Backend, items, make_backend

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_a_created_item_is_committed_and_the_dependency_is_request_state_db(
    backend: Backend,
) -> None:
    async with client(items_app(backend)) as c:
        response = await c.post("/items/apple")
    assert response.status_code == 201
    assert backend.names() == ["apple"]


async def test_a_raised_http_exception_rolls_back_by_its_status(backend: Backend) -> None:
    async with client(items_app(backend)) as c:
        response = await c.post("/conflict/pear")
    assert response.status_code == 409
    assert backend.names() == []


async def test_a_returned_error_response_rolls_back_by_its_status(backend: Backend) -> None:
    async with client(items_app(backend)) as c:
        response = await c.post("/returned-400/plum")
    assert response.status_code == 400
    assert backend.names() == []


async def test_an_unhandled_exception_rolls_back_and_the_500_reveals_nothing(
    backend: Backend,
) -> None:
    async with client(items_app(backend)) as c:
        response = await c.post("/boom/fig")
    assert response.status_code == 500
    assert "secret" not in response.text
    assert backend.names() == []


async def test_background_work_with_its_own_session_is_kept_and_a_late_write_is_reported(
    backend: Backend,
) -> None:
    with capture_logs() as logs:
        async with client(items_app(backend)) as c:
            response = await c.post("/background/kiwi")
    assert response.status_code == 202
    assert backend.names() == ["kiwi-own-session"]
    late = [e for e in logs if e["event"] == "db_session.late_write"]
    assert len(late) == 1
    assert late[0]["route"] == "/background/{name}"


async def test_a_route_that_never_asks_for_the_session_creates_none(backend: Backend) -> None:
    with capture_logs() as logs:
        async with client(items_app(backend)) as c:
            response = await c.get("/no-db")
    assert response.status_code == 200
    assert not [e for e in logs if e["event"].startswith("db_session.")]


async def test_a_session_first_asked_for_after_its_request_is_refused_naming_the_route(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    kept: list[Any] = []
    app = FastAPI()

    @app.get("/later/{name}")
    async def later(request: Request) -> dict[str, str]:
        kept.append(request.scope["state"])  # never asks for the session while it runs
        return {}

    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=registry)
    async with client(app) as c:
        assert (await c.get("/later/x")).status_code == 200
    state = kept[0]
    with pytest.raises(SessionClosedError, match=r"\(route /later/\{name\}\) was requested"):
        state["db"]  # request.state.db
    with pytest.raises(SessionClosedError, match="was requested after its request finished"):
        await state.open("db")  # what the DBSession/AsyncDBSession dependency does
    assert "db" not in dict(state)
    assert backend.checkedout() == 0
    assert (
        registry.get_sample_value(
            "db_session_use_after_close_total", {"db": "default", "route": "/later/{name}"}
        )
        == 2
    )


async def test_the_middleware_works_on_a_plain_starlette_app(backend: Backend) -> None:
    async def create(request: Request) -> JSONResponse:
        session = request.state.db
        await backend.insert(session, request.path_params["name"])
        return JSONResponse({}, status_code=201)

    app = Starlette(routes=[Route("/items/{name}", create, methods=["POST"])])
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())
    async with client(app) as c:
        assert (await c.post("/items/starlette")).status_code == 201
    assert backend.names() == ["starlette"]


async def test_two_databases_each_get_their_own_session_by_name(tmp_path: Any) -> None:
    (tmp_path / "main").mkdir()
    (tmp_path / "audit").mkdir()
    main = make_backend("sqlite-sync", tmp_path / "main")
    audit = make_backend("sqlite-async", tmp_path / "audit")
    app = FastAPI()
    registry = CollectorRegistry()
    app.add_middleware(DBSessionMiddleware, engine=main.engine, registry=registry)
    app.add_middleware(
        DBSessionMiddleware,
        engine=audit.engine,
        name="audit",
        state_key="audit_db",
        registry=registry,
    )
    AuditDB = get_session("audit", kind=AsyncSession)

    from fastapi import Depends

    @app.post("/both/{name}")
    async def both(
        name: str, db: DBSession, audit_db: AsyncSession = Depends(AuditDB)
    ) -> dict[str, str]:
        assert isinstance(db, Session)
        await audit_db.execute(items.insert().values(name=f"audit-{name}"))
        return {}

    try:
        async with client(app) as c:
            assert (await c.post("/both/x")).status_code == 200
        assert audit.names() == ["audit-x"]
        assert main.names() == []
    finally:
        await main.dispose()
        await audit.dispose()


@pytest.mark.parametrize("scope", [None, "function"])
async def test_yield_dependencies_of_either_scope_can_build_on_the_request_session(
    backend: Backend, scope: str | None
) -> None:
    from collections.abc import AsyncIterator

    from fastapi import Depends

    if scope is not None and "scope" not in inspect.signature(Depends).parameters:
        pytest.fail("this FastAPI has no Depends(scope=): the test needs FastAPI >= 0.121")
    # The very Depends of the Annotated type (this module's annotations are strings, which
    # FastAPI resolves against the module, not this function).
    session: Any = (AsyncDBSession if backend.is_async else DBSession).__metadata__[0]
    seen: list[Any] = []

    async def repository(db: Any = session) -> AsyncIterator[Any]:  # a user's yield dependency
        seen.append(db)
        yield db

    depends = Depends(repository) if scope is None else Depends(repository, scope=scope)
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())

    @app.post("/items/{name}", status_code=201)
    async def create(name: str, request: Request, repo: Any = depends, db: Any = session) -> None:
        assert repo is db is request.state.db
        await backend.insert(db, name)

    async with client(app) as c:
        assert (await c.post("/items/yielded")).status_code == 201
    assert backend.names() == ["yielded"]
    assert len(seen) == 1


async def test_asking_for_the_wrong_session_kind_is_a_clear_error(backend: Backend) -> None:
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())

    if backend.is_async:

        @app.get("/")
        def wrong(db: DBSession) -> None: ...

        expected = "use AsyncDBSession"
    else:

        @app.get("/")
        async def wrong(db: AsyncDBSession) -> None: ...  # type: ignore[misc]

        expected = "use DBSession"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        with pytest.raises(SessionNotAvailableError, match=expected):
            await c.get("/")


async def test_a_route_without_the_middleware_gets_a_clear_error() -> None:
    app = FastAPI()

    @app.get("/")
    def route(db: DBSession) -> None: ...

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        with pytest.raises(SessionNotAvailableError, match="add it with"):
            await c.get("/")


async def test_dependency_overrides_replace_the_request_session() -> None:
    """FastAPI's usual override: ``app.dependency_overrides[get_db] = ...`` reaches every
    route declaring ``DBSession`` (``get_async_db`` for ``AsyncDBSession``)."""
    from sessionscope.fastapi import get_async_db, get_db

    app = FastAPI()

    @app.get("/sync")
    def sync_route(db: DBSession) -> str:
        return str(db.info["who"])

    @app.get("/async")
    async def async_route(db: AsyncDBSession) -> str:
        return str(db.info["who"])

    def fake_session() -> Session:
        return Session(info={"who": "override"})

    def fake_async_session() -> AsyncSession:
        return AsyncSession(info={"who": "async override"})

    app.dependency_overrides[get_db] = fake_session
    app.dependency_overrides[get_async_db] = fake_async_session
    async with client(app) as c:
        assert (await c.get("/sync")).json() == "override"
        assert (await c.get("/async")).json() == "async override"
