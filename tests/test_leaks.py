"""Leak detection: a session held past the threshold is reported once, then resolved."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import AsyncDBSession, DBSession

from .metric_support import value
from .support import Backend, request, wait_until

pytestmark = pytest.mark.anyio

THRESHOLD = 0.2


def leaky_app(backend: Backend, registry: CollectorRegistry, release: anyio.Event) -> FastAPI:
    """``/slow`` holds its session (with an open transaction) until ``release`` is set."""
    app = FastAPI()
    app.add_middleware(
        DBSessionMiddleware,
        engine=backend.engine,
        registry=registry,
        leak_threshold=THRESHOLD,
        leak_exempt_routes=("/export",),
    )
    if backend.is_async:

        @app.get("/slow")
        async def slow_holder(db: AsyncDBSession) -> dict[str, int]:
            await backend.count(db)
            await release.wait()
            return {}

        @app.get("/export")
        async def export(db: AsyncDBSession) -> dict[str, int]:
            await backend.count(db)
            await release.wait()
            return {}
    else:

        @app.get("/slow")
        def slow_holder(db: DBSession) -> dict[str, int]:
            from .support import items

            db.execute(items.select())
            anyio.from_thread.run(release.wait)
            return {}

        @app.get("/export")
        def export(db: DBSession) -> dict[str, int]:
            from .support import items

            db.execute(items.select())
            anyio.from_thread.run(release.wait)
            return {}

    return app


async def test_a_session_held_past_the_threshold_is_detected_then_resolved(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    release = anyio.Event()
    app = leaky_app(backend, registry, release)
    transport = httpx.ASGITransport(app=app)
    with capture_logs() as logs:
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as c,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(c.get, "/slow")
            await wait_until(lambda: value(registry, "db_sessions_leak_suspected") == 1)
            assert value(registry, "db_session_oldest_age_seconds") >= THRESHOLD
            assert value(registry, "db_session_leaks_detected_total", route="/slow") == 1
            release.set()
        await wait_until(lambda: value(registry, "db_sessions_leak_suspected") == 0)
    assert value(registry, "db_session_leaks_resolved_total", route="/slow") == 1
    (suspected,) = [e for e in logs if e["event"] == "db_session.leak_suspected"]
    assert suspected["log_level"] == "warning"
    assert suspected["route"] == "/slow"
    assert suspected["method"] == "GET"
    assert suspected["age_s"] >= THRESHOLD
    assert suspected["in_transaction"] is True
    assert suspected["holds_connection"] is True
    assert "slow_holder" in suspected["stack"]  # where the session is held right now
    (resolved,) = [e for e in logs if e["event"] == "db_session.leak_resolved"]
    assert resolved["held_s"] >= THRESHOLD
    assert resolved["request_id"] == suspected["request_id"]


async def test_an_exempt_route_is_never_reported(backend: Backend) -> None:
    registry = CollectorRegistry()
    release = anyio.Event()
    app = leaky_app(backend, registry, release)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(c.get, "/export")
        await anyio.sleep(THRESHOLD * 3)
        assert value(registry, "db_session_leaks_detected_total", route="/export") == 0
        assert value(registry, "db_sessions_leak_suspected") == 0
        release.set()


async def test_leak_detection_can_be_turned_off(backend: Backend) -> None:
    registry = CollectorRegistry()
    mw = DBSessionMiddleware(
        FastAPI(), engine=backend.engine, registry=registry, leak_threshold=None
    )
    assert mw.settings.reporter.leaks is None
    assert value(registry, "db_leak_threshold_seconds") == 0


async def test_a_sweep_that_raises_is_logged_and_later_leaks_are_still_detected(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    release = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.count(scope["state"]["db"])  # holds a connection from here on
        if scope["path"] == "/leak":
            await release.wait()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    mw = DBSessionMiddleware(
        app, engine=backend.engine, registry=registry, leak_threshold=THRESHOLD
    )
    leaks = mw.settings.reporter.leaks
    assert leaks is not None
    report_sweep = leaks.on_sweep
    sweeps: list[int] = []

    def fails_once(over_threshold: int, oldest_age: float) -> None:
        sweeps.append(over_threshold)
        if len(sweeps) == 1:
            raise RuntimeError("gauge backend unavailable")
        report_sweep(over_threshold, oldest_age)

    leaks.on_sweep = fails_once
    with capture_logs() as logs:
        assert (await request(mw, "/quick")).status == 200  # starts the sweep thread
        await wait_until(lambda: any(e["event"] == "db_session.sweep_failed" for e in logs))
        failed_after = len(sweeps)
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, mw, "/leak")  # held past the threshold after the failure
            await wait_until(lambda: value(registry, "db_sessions_leak_suspected") == 1)
            assert value(registry, "db_session_oldest_age_seconds") >= THRESHOLD
            release.set()
        await wait_until(lambda: value(registry, "db_sessions_leak_suspected") == 0)

    (failed,) = [e for e in logs if e["event"] == "db_session.sweep_failed"]
    assert failed["log_level"] == "error"
    assert failed["error_type"] == "RuntimeError"
    assert failed["error"] == "gauge backend unavailable"
    assert "in fails_once" in failed["traceback"]
    events = [e["event"] for e in logs]
    assert events.index("db_session.sweep_failed") < events.index("db_session.leak_suspected")
    (suspected,) = [e for e in logs if e["event"] == "db_session.leak_suspected"]
    assert suspected["age_s"] >= THRESHOLD
    assert suspected["holds_connection"] is True
    assert value(registry, "db_session_leaks_detected_total", route="__unmatched__") == 1
    assert value(registry, "db_session_leaks_resolved_total", route="__unmatched__") == 1
    assert len(sweeps) > failed_after  # the same sweep thread kept running after the failure
