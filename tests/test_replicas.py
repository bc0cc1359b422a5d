"""replica_engine=: read-only requests read from the replica, and cannot write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import ConfigurationError, DBSessionMiddleware, ReadOnlyRequestError

from .metric_support import value
from .support import BACKENDS, Backend, driver_url, items, make_backend, metadata, postgres_url

pytestmark = pytest.mark.anyio


@dataclass
class Replicated:
    primary: Backend
    replica: sa.engine.Engine | AsyncEngine
    replica_check: sa.engine.Engine


@pytest.fixture(params=BACKENDS)
async def replicated(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Replicated]:
    """A primary and a 'replica' holding different rows, so reads show where they went."""
    kind: str = request.param
    primary = make_backend(kind, tmp_path)
    if kind.startswith("sqlite"):
        file = tmp_path / "replica.db"
        check = sa.create_engine(f"sqlite:///{file}")
        metadata.create_all(check)
        driver = "sqlite+aiosqlite" if kind == "sqlite-async" else "sqlite"
        url = f"{driver}:///{file}"
        options: dict[str, Any] = {}
    else:
        base = postgres_url()
        assert base is not None
        check = sa.create_engine(
            driver_url(base, async_=False), connect_args={"options": "-csearch_path=ss_replica"}
        )
        with check.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA IF EXISTS ss_replica CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA ss_replica"))
            metadata.create_all(conn)
        url = driver_url(base, async_=kind == "pg-async")
        options = (
            {"connect_args": {"server_settings": {"search_path": "ss_replica"}}}
            if kind == "pg-async"
            else {"connect_args": {"options": "-csearch_path=ss_replica"}}
        )
    with check.begin() as conn:
        conn.execute(items.insert().values(name="on-replica"))
    replica: Any = (
        create_async_engine(url, **options)
        if kind.endswith("async")
        else sa.create_engine(url, **options)
    )
    try:
        yield Replicated(primary, replica, check)
        sync_replica = replica.sync_engine if isinstance(replica, AsyncEngine) else replica
        assert sync_replica.pool.checkedout() == 0
        assert primary.checkedout() == 0
    finally:
        if isinstance(replica, AsyncEngine):
            await replica.dispose()
        else:
            replica.dispose()
        check.dispose()
        await primary.dispose()


def replicated_app(db: Replicated, **options: Any) -> Starlette:
    async def names(request: Request) -> JSONResponse:
        session = request.state.db
        rows = await db.primary.run(session, lambda s: s.execute(sa.select(items.c.name)).all())
        return JSONResponse([r[0] for r in rows])

    async def write(request: Request) -> JSONResponse:
        await db.primary.insert(request.state.db, "written")
        return JSONResponse({}, status_code=201)

    routes = [
        Route("/names", names, methods=["GET", "POST"]),
        Route("/write", write, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes)
    options.setdefault("registry", CollectorRegistry())
    app.add_middleware(
        DBSessionMiddleware, engine=db.primary.engine, replica_engine=db.replica, **options
    )
    return app


def client(app: Any, raise_errors: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_errors)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_get_requests_read_from_the_replica_and_others_from_the_primary(
    replicated: Replicated,
) -> None:
    async with client(replicated_app(replicated)) as c:
        assert (await c.get("/names")).json() == ["on-replica"]
        assert (await c.post("/names")).json() == []
        assert (await c.post("/write")).status_code == 201
    assert replicated.primary.names() == ["written"]


async def test_a_write_in_a_read_only_request_fails_loudly_and_writes_nothing(
    replicated: Replicated,
) -> None:
    with capture_logs():
        async with client(replicated_app(replicated)) as c:
            with pytest.raises(ReadOnlyRequestError, match="read replica"):
                await c.get("/write")
    assert replicated.primary.names() == []
    with replicated.replica_check.connect() as conn:
        assert conn.execute(sa.select(items.c.name)).scalars().all() == ["on-replica"]


async def test_the_read_only_methods_are_configurable(replicated: Replicated) -> None:
    app = replicated_app(replicated, read_only_methods=("POST",))
    async with client(app) as c:
        assert (await c.post("/names")).json() == ["on-replica"]
        assert (await c.get("/names")).json() == []


async def test_the_replica_pool_has_its_own_metrics(replicated: Replicated) -> None:
    registry = CollectorRegistry()
    async with client(replicated_app(replicated, registry=registry)) as c:
        await c.get("/names")
    assert value(registry, "db_pool_connections_created_total", db="default_replica") >= 1
    assert value(registry, "db_sessions_closed_total", route="/names", outcome="commit") == 1


def test_a_replica_of_another_kind_is_refused() -> None:
    primary = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    replica = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match="must be a sync Engine like the primary"):
        DBSessionMiddleware(
            Starlette(), engine=primary, replica_engine=replica, registry=CollectorRegistry()
        )
    primary.dispose()


# Writes a keyword check on the SQL text does not see: the database itself must refuse them.
BYPASSES = {
    "comment-block": "/* tag */ INSERT INTO ss_items (name) VALUES ('sneaked')",
    "comment-line": "-- c\nINSERT INTO ss_items (name) VALUES ('sneaked')",
    "cte-insert": "WITH i AS (INSERT INTO ss_items (name) VALUES ('sneaked') RETURNING id) "
    "SELECT id FROM i",
    "cte-delete": "WITH d AS (DELETE FROM ss_items RETURNING id) SELECT count(*) FROM d",
}


@pytest.mark.parametrize(
    ("backend", "statement"),
    [
        pytest.param(kind, statement, id=f"{kind}-{statement}")
        for kind in BACKENDS
        for statement in sorted(BYPASSES)
        if not (kind.startswith("sqlite") and statement.startswith("cte"))  # no such WITH there
    ],
    indirect=["backend"],
)
async def test_the_database_refuses_every_write_of_a_read_only_request(
    backend: Backend, statement: str
) -> None:
    with backend.check.begin() as conn:
        conn.execute(items.insert().values(name="kept"))
    # The same database as 'replica': what is tested is the guard, not the routing.
    replica: Any = (
        create_async_engine(backend.engine.url)
        if isinstance(backend.engine, AsyncEngine)
        else sa.create_engine(backend.engine.url)
    )

    async def run(request: Request) -> JSONResponse:
        sql = sa.text(BYPASSES[statement])
        await backend.run(request.state.db, lambda s: s.execute(sql))
        return JSONResponse("ran")

    app = Starlette(routes=[Route("/run", run)])
    app.add_middleware(
        DBSessionMiddleware,
        engine=backend.engine,
        replica_engine=replica,
        registry=CollectorRegistry(),
    )
    try:
        with capture_logs():
            async with client(app) as c:
                with pytest.raises(ReadOnlyRequestError, match="read replica"):
                    await c.get("/run")
        assert backend.names() == ["kept"]
        sync_replica = replica.sync_engine if isinstance(replica, AsyncEngine) else replica
        assert sync_replica.pool.checkedout() == 0
    finally:
        if isinstance(replica, AsyncEngine):
            await replica.dispose()
        else:
            replica.dispose()


async def test_a_connection_shared_with_the_primary_writes_again_after_a_read_only_request(
    backend: Backend,
) -> None:
    """The read-only mode lasts one transaction: the same engine as primary and replica (one
    pool) still writes in a POST after a GET."""

    async def names(request: Request) -> JSONResponse:
        return JSONResponse(await backend.count(request.state.db))

    async def write(request: Request) -> JSONResponse:
        await backend.insert(request.state.db, "written")
        return JSONResponse({}, status_code=201)

    routes = [Route("/names", names), Route("/write", write, methods=["POST"])]
    app = Starlette(routes=routes)
    app.add_middleware(
        DBSessionMiddleware,
        engine=backend.engine,
        replica_engine=backend.engine,
        registry=CollectorRegistry(),
    )
    async with client(app) as c:
        for _ in range(3):
            assert (await c.get("/names")).status_code == 200
        assert (await c.post("/write")).status_code == 201
    assert backend.names() == ["written"]
