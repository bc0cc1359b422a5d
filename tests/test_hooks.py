"""on_commit(): side effects that happen only when the request's data was committed."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware, on_commit

from .metric_support import value
from .support import Backend, children, request

pytestmark = pytest.mark.anyio


def app_with_hooks(backend: Backend, status: int, events: list[Any], **hook_options: Any) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.insert(session, "x")
        on_commit(session, lambda: events.append(("HOOK", threading.current_thread().name)))

        async def async_hook() -> None:
            events.append(("ASYNC_HOOK",))

        on_commit(session, async_hook, **hook_options)
        await send({"type": "http.response.start", "status": status})
        await send({"type": "http.response.body", "body": b"done"})

    return DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry())


def kinds(log: list[Any]) -> list[str]:
    return [e[1] if e[0] == "SEND" else e[0] for e in log]


async def test_hooks_run_after_the_commit_and_before_the_client_gets_the_status(
    backend: Backend,
) -> None:
    await request(app_with_hooks(backend, 201, backend.log), log=backend.log)
    assert kinds(backend.log) == [
        "COMMIT",
        "HOOK",
        "ASYNC_HOOK",
        "http.response.start",
        "http.response.body",
    ]
    sync_hook_thread = next(e[1] for e in backend.log if e[0] == "HOOK")
    assert sync_hook_thread != threading.current_thread().name  # sync hooks never block the loop


async def test_an_after_response_hook_runs_once_the_response_is_complete(backend: Backend) -> None:
    app = app_with_hooks(backend, 200, backend.log, after_response=True)
    await request(app, log=backend.log)
    assert kinds(backend.log) == [
        "COMMIT",
        "HOOK",
        "http.response.start",
        "http.response.body",
        "ASYNC_HOOK",
    ]


@pytest.mark.parametrize("status", [400, 409, 500])
async def test_hooks_never_run_when_the_request_rolls_back(backend: Backend, status: int) -> None:
    events: list[Any] = []
    await request(app_with_hooks(backend, status, events, after_response=True))
    assert events == []
    assert backend.names() == []


async def test_hooks_never_run_when_the_app_raises(backend: Backend) -> None:
    events: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        on_commit(scope["state"]["db"], lambda: events.append("hook"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await request(DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry()))
    assert events == []


async def test_hooks_never_run_when_the_commit_fails(backend: Backend) -> None:
    events: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.run(session, lambda s: s.execute(children.insert().values(id=1, parent_id=5)))
        on_commit(session, lambda: events.append("hook"))
        on_commit(session, lambda: events.append("after"), after_response=True)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    ex = await request(
        DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry())
    )
    assert ex.status == 500
    assert events == []


async def test_a_failing_hook_is_logged_and_counted_and_the_request_stays_committed(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()
    events: list[str] = []

    def broken() -> None:
        raise ValueError("mail server down")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.insert(session, "kept")
        on_commit(session, broken)
        on_commit(session, lambda: events.append("next hook"))
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body"})

    with capture_logs() as logs:
        ex = await request(DBSessionMiddleware(app, engine=backend.engine, registry=registry))
    assert ex.status == 201
    assert backend.names() == ["kept"]
    assert events == ["next hook"]
    (failed,) = [e for e in logs if e["event"] == "db_session.hook_failed"]
    assert failed["error_type"] == "ValueError"
    assert "broken" in failed["hook"]
    assert value(registry, "db_session_errors_total", phase="hook", error_type="other") == 1


async def test_a_hook_can_be_registered_through_the_request(backend: Backend) -> None:
    events: list[str] = []
    app = FastAPI()
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, registry=CollectorRegistry())

    @app.post("/orders/{ok}")
    async def order(ok: int, request: Request) -> dict[str, str]:
        session = request.state.db
        await backend.insert(session, f"order-{ok}")
        on_commit(request, lambda: events.append(f"receipt {ok}"))
        if not ok:
            raise HTTPException(422)
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/orders/1")).status_code == 200
        assert (await c.post("/orders/0")).status_code == 422
    assert events == ["receipt 1"]


async def test_registering_a_hook_after_the_decision_is_a_clear_error(backend: Backend) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        with pytest.raises(RuntimeError, match="after the request transaction was decided"):
            on_commit(session, lambda: None)
        await send({"type": "http.response.body"})

    await request(DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry()))


def test_a_hook_outside_a_request_is_a_clear_error() -> None:
    from sessionscope import SessionNotAvailableError

    with pytest.raises(SessionNotAvailableError, match="session_scope"):
        on_commit(object(), lambda: None)  # type: ignore[arg-type]
