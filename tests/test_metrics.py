"""Session metrics: every closed session counted by route and outcome, rollbacks by reason."""

from __future__ import annotations

import random
import string
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware, session_scope
from sessionscope.catalogue import CATALOGUE
from sessionscope.fastapi import AsyncDBSession, DBSession

from .apps import items_app
from .metric_support import series, value
from .support import Backend, children, items, request

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_a_committed_request_is_counted_by_route_and_outcome(backend: Backend) -> None:
    registry = CollectorRegistry()
    async with client(items_app(backend, registry=registry)) as c:
        assert (await c.post("/items/a")).status_code == 201
    route = "/items/{name}"
    assert value(registry, "db_sessions_closed_total", route=route, outcome="commit") == 1
    assert value(registry, "db_session_duration_seconds_count", outcome="commit") == 1
    assert value(registry, "db_session_held_seconds_total", route=route) > 0
    assert value(registry, "db_statements_total", route=route) == 1
    assert value(registry, "db_session_statements_sum") == 1
    assert value(registry, "db_session_commit_duration_seconds_count") == 1
    assert value(registry, "db_sessions_open") == 0
    assert value(registry, "db_leak_threshold_seconds") == 60


@pytest.mark.parametrize(
    ("path", "reason", "status"),
    [
        ("/conflict/b", "status_4xx", 409),
        ("/returned-400/c", "status_4xx", 400),
        ("/boom/d", "exception", 500),
    ],
)
async def test_rollbacks_are_counted_by_reason(
    backend: Backend, path: str, reason: str, status: int
) -> None:
    registry = CollectorRegistry()
    async with client(items_app(backend, registry=registry)) as c:
        assert (await c.post(path)).status_code == status
    assert value(registry, "db_session_rollbacks_total", reason=reason) == 1
    route = path.rsplit("/", 1)[0] + "/{name}"
    assert value(registry, "db_sessions_closed_total", route=route, outcome="rollback") == 1
    others = {"status_4xx", "status_5xx", "exception", "cancelled", "commit_error", "late_write"}
    others |= {"pool_timeout"}
    for other in others - {reason}:
        assert value(registry, "db_session_rollbacks_total", reason=other) == 0


def unavailable_app(backend: Backend, registry: CollectorRegistry) -> FastAPI:
    """``POST /unavailable/{name}`` writes a row, then returns a ``503`` response itself."""
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=registry)
    if backend.is_async:

        @app.post("/unavailable/{name}")
        async def unavailable_async(name: str, db: AsyncDBSession) -> JSONResponse:
            await db.execute(items.insert().values(name=name))
            return JSONResponse({"error": "maintenance"}, status_code=503)

    else:

        @app.post("/unavailable/{name}")
        def unavailable(name: str, db: DBSession) -> JSONResponse:
            db.execute(items.insert().values(name=name))
            return JSONResponse({"error": "maintenance"}, status_code=503)

    return app


async def test_a_returned_5xx_response_after_a_write_is_counted_as_a_status_5xx_rollback(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    async with client(unavailable_app(backend, registry)) as c:
        response = await c.post("/unavailable/e")
    assert response.status_code == 503
    assert response.json() == {"error": "maintenance"}  # the app's own response, not replaced
    assert backend.names() == []  # the write was rolled back
    assert value(registry, "db_session_rollbacks_total", reason="status_5xx") == 1
    route = "/unavailable/{name}"
    assert value(registry, "db_sessions_closed_total", route=route, outcome="rollback") == 1
    assert value(registry, "db_sessions_closed_total", route=route, outcome="commit") == 0
    assert value(registry, "db_session_duration_seconds_count", outcome="rollback") == 1
    others = {"status_4xx", "exception", "cancelled", "commit_error", "late_write", "pool_timeout"}
    for other in others:
        assert value(registry, "db_session_rollbacks_total", reason=other) == 0


async def test_the_namespace_option_prefixes_every_exported_metric(backend: Backend) -> None:
    registry = CollectorRegistry()
    async with client(items_app(backend, registry=registry, namespace="shop")) as c:
        assert (await c.post("/items/a")).status_code == 201
        assert (await c.post("/conflict/b")).status_code == 409
    route = "/items/{name}"
    assert value(registry, "shop_sessions_closed_total", route=route, outcome="commit") == 1
    assert value(registry, "shop_session_rollbacks_total", reason="status_4xx") == 1
    assert value(registry, "shop_session_duration_seconds_count", outcome="commit") == 1
    assert value(registry, "shop_statements_total", route=route) == 1
    assert value(registry, "shop_sessions_open") == 0
    assert value(registry, "shop_leak_threshold_seconds") == 60
    assert value(registry, "shop_pool_connections_max") == 15  # SQLAlchemy's 5 + 10
    assert value(registry, "shop_pool_connections", state="used") == backend.checkedout() == 0
    assert value(registry, "shop_pool_use_seconds_count") >= 2
    # Every family is exported under the namespace, and nothing under the default one.
    text = generate_latest(registry).decode()
    helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
    families = {name for name in helped if not name.endswith("_created")}  # client extras
    assert families == {m.exported("shop") for m in CATALOGUE}
    assert [line for line in series(registry) if not line.startswith("shop_")] == []
    assert registry.get_sample_value("db_sessions_open", {"db": "default"}) is None


async def test_a_late_write_is_counted_as_a_late_write_rollback(backend: Backend) -> None:
    registry = CollectorRegistry()
    async with client(items_app(backend, registry=registry)) as c:
        assert (await c.post("/background/e")).status_code == 202
    assert value(registry, "db_session_rollbacks_total", reason="late_write") == 1
    assert (
        value(registry, "db_sessions_closed_total", route="/background/{name}", outcome="commit")
        == 0
    )
    assert (
        value(registry, "db_sessions_closed_total", route="/background/{name}", outcome="unused")
        + value(
            registry, "db_sessions_closed_total", route="/background/{name}", outcome="rollback"
        )
        == 1
    )


async def test_a_failed_commit_counts_a_commit_error_by_error_type(backend: Backend) -> None:
    registry = CollectorRegistry()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.run(
            scope["state"]["db"], lambda s: s.execute(children.insert().values(id=1, parent_id=7))
        )
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    ex = await request(DBSessionMiddleware(app, engine=backend.engine, registry=registry))
    assert ex.status == 500
    assert value(registry, "db_session_rollbacks_total", reason="commit_error") == 1
    assert (
        value(registry, "db_session_errors_total", phase="commit", error_type="IntegrityError") == 1
    )


async def test_a_cancelled_request_is_counted_as_a_cancelled_rollback(backend: Backend) -> None:
    registry = CollectorRegistry()
    inserted = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "x")
        inserted.set()
        await anyio.sleep_forever()

    mw = DBSessionMiddleware(app, engine=backend.engine, registry=registry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(request, mw)
        await inserted.wait()
        assert value(registry, "db_sessions_open") == 1
        tg.cancel_scope.cancel()
    assert value(registry, "db_session_rollbacks_total", reason="cancelled") == 1
    assert value(registry, "db_sessions_open") == 0


async def test_a_session_that_only_streams_is_not_counted_unused(backend: Backend) -> None:
    """Statements run only after the response started (a streamed export): the session was
    used; its outcome is what the status decided, as for a request that read first."""
    registry = CollectorRegistry()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        for _ in range(2):
            count = await backend.count(session)
            await send({"type": "http.response.body", "body": b"%d" % count, "more_body": True})
        await send({"type": "http.response.body"})

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine, registry=registry))
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [(e["outcome"], e["statements"]) for e in closed] == [("commit", 2)]
    assert value(registry, "db_sessions_closed_total", route="__unmatched__", outcome="unused") == 0
    assert value(registry, "db_sessions_closed_total", route="__unmatched__", outcome="commit") == 1
    assert value(registry, "db_session_rollbacks_total") == 0


async def test_a_session_never_used_is_counted_unused(backend: Backend) -> None:
    registry = CollectorRegistry()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    await request(DBSessionMiddleware(app, engine=backend.engine, registry=registry))
    assert value(registry, "db_sessions_closed_total", route="__unmatched__", outcome="unused") == 1
    assert value(registry, "db_session_statements_bucket", le="0.0") == 1


async def test_use_after_close_is_counted_by_route(backend: Backend) -> None:
    registry = CollectorRegistry()
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept.append(scope["state"]["db"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    await request(DBSessionMiddleware(app, engine=backend.engine, registry=registry))
    with pytest.raises(Exception, match="after its request finished"):
        await backend.count(kept[0])
    assert value(registry, "db_session_use_after_close_total", route="__unmatched__") == 1


async def test_ten_thousand_requests_to_random_unknown_paths_add_no_series() -> None:
    import sqlalchemy as sa

    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    registry = CollectorRegistry()
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)

    @app.get("/known")
    def known() -> dict[str, str]:
        return {}

    rng = random.Random(7)
    async with client(app) as c:
        await c.get("/known")
        before = series(registry)
        for _ in range(10_000):
            path = "/" + "".join(rng.choices(string.ascii_letters + "/%.", k=rng.randint(1, 40)))
            method = rng.choice(["GET", "POST", "DELETE", "PATCH", "BREW"])
            await c.request(method, path)
    assert series(registry) == before
    engine.dispose()


async def test_routes_beyond_the_cap_are_folded_into_other(backend: Backend) -> None:
    registry = CollectorRegistry()
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=registry, max_routes=3)
    from sessionscope.fastapi import get_session

    dependency = get_session()
    from fastapi import Depends

    for i in range(6):

        @app.get(f"/r{i}/{{x}}")
        async def route(x: str, db: Any = Depends(dependency)) -> dict[str, str]:
            return {}

    async with client(app) as c:
        for i in range(6):
            assert (await c.get(f"/r{i}/1")).status_code == 200
    labels = {line for line in series(registry) if line.startswith("db_sessions_closed_total{")}
    routes = {line.split('route="')[1].split('"')[0] for line in labels}
    assert routes == {"/r0/{x}", "/r1/{x}", "/r2/{x}", "__other__"}
    assert value(registry, "db_sessions_closed_total", route="__other__", outcome="unused") == 3


async def test_a_session_scope_session_garbage_collected_unclosed_is_counted(
    backend: Backend,
) -> None:
    import gc

    from structlog.testing import capture_logs

    registry = CollectorRegistry()
    with capture_logs() as logs:
        scope: Any = session_scope(backend.engine, registry=registry)  # type: ignore[call-overload]
        if backend.is_async:
            await scope.__aenter__()
        else:
            scope.__enter__()
        del scope
        gc.collect()
    assert value(registry, "db_sessions_gc_unclosed_total") == 1
    (event,) = [e for e in logs if e["event"] == "db_session.gc_unclosed"]
    assert "test_metrics.py" in event["opened_at"]


async def test_the_exposition_passes_promtool_check_metrics(backend: Backend) -> None:
    from .prometheus_tools import promtool

    registry = CollectorRegistry()
    async with client(items_app(backend, registry=registry)) as c:
        for path in ("/items/a", "/conflict/b", "/boom/c", "/background/d"):
            await c.post(path)
    result = await anyio.run_process(
        [promtool(), "check", "metrics"], input=generate_latest(registry), check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_route_labels_keep_router_prefixes_and_mount_paths() -> None:
    """One route included with and without a prefix, and mounted twice: four series, each
    labelled with the full template (never the raw path)."""
    engine = sa.create_engine("sqlite://", poolclass=sa.StaticPool)
    registry = CollectorRegistry()
    router = APIRouter()

    @router.get("/items/{i}")
    async def item(i: int, request: Request) -> int:
        request.state.db  # noqa: B018 - creates the session
        return i

    async def plain(request: Any) -> JSONResponse:
        request.state.db  # noqa: B018
        return JSONResponse(1)

    app = FastAPI()
    app.include_router(router, prefix="/a")
    app.include_router(router)
    sub = FastAPI()
    sub.include_router(router)
    app.mount("/v2", sub)
    app.mount("/t/{tenant}", Starlette(routes=[Route("/items/{i}", plain)]))
    app.add_middleware(DBSessionMiddleware, engine=engine, registry=registry)
    async with client(app) as c:
        for path in ["/a/items/1", "/items/2", "/v2/items/3", "/t/acme/items/4", "/a/items/5"]:
            assert (await c.get(path)).status_code == 200
    labels = {
        route: value(registry, "db_sessions_closed_total", route=route, outcome="unused")
        for route in ["/a/items/{i}", "/items/{i}", "/v2/items/{i}", "/t/{tenant}/items/{i}"]
    }
    assert labels == {
        "/a/items/{i}": 2,
        "/items/{i}": 1,
        "/v2/items/{i}": 1,
        "/t/{tenant}/items/{i}": 1,
    }
    engine.dispose()
