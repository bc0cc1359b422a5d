"""Log events: one canonical event per session, request ids that cannot be forged."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware

from .support import Backend, request

pytestmark = pytest.mark.anyio


def app_for(backend: Backend, **options: Any) -> DBSessionMiddleware:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.count(scope["state"]["db"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body"})

    return DBSessionMiddleware(app, engine=backend.engine, registry=CollectorRegistry(), **options)


async def test_one_closed_event_per_session_with_what_happened(backend: Backend) -> None:
    with capture_logs() as logs:
        await request(app_for(backend), "/x", method="POST")
    (closed,) = logs
    assert closed["event"] == "db_session.closed"
    assert closed["log_level"] == "debug"
    assert closed["db"] == "default"
    assert closed["method"] == "POST"
    assert closed["route"] == "__unmatched__"
    assert closed["status"] == 201
    assert closed["outcome"] == "commit"
    assert closed["reason"] is None
    assert closed["statements"] == 1
    assert closed["duration_s"] > 0
    assert len(closed["request_id"]) == 32


async def test_the_closed_event_level_is_configurable_and_can_be_off(backend: Backend) -> None:
    with capture_logs() as logs:
        await request(app_for(backend, closed_log_level="info"))
        await request(app_for(backend, closed_log_level=None))
    assert [e["log_level"] for e in logs] == ["info"]


async def test_a_valid_x_request_id_is_used(backend: Backend) -> None:
    with capture_logs() as logs:
        await request(app_for(backend), headers=[(b"x-request-id", b"req-42.a:b")])
    assert logs[0]["request_id"] == "req-42.a:b"


@pytest.mark.parametrize(
    "hostile",
    [b"x" * 129, b"evil\nevent=forged", b'"quoted"', b"spaces are not ok", b""],
)
async def test_an_oversized_or_malformed_x_request_id_is_replaced_never_logged(
    backend: Backend, hostile: bytes
) -> None:
    with capture_logs() as logs:
        await request(app_for(backend), headers=[(b"x-request-id", hostile)])
    (closed,) = logs
    assert closed["request_id"] != hostile.decode()
    assert len(closed["request_id"]) == 32
    if hostile:  # the empty header is simply absent from the logs
        assert hostile.decode() not in repr(logs)


async def test_asgi_correlation_id_is_used_when_that_middleware_runs_outside(
    backend: Backend,
) -> None:
    from asgi_correlation_id import CorrelationIdMiddleware

    outer = CorrelationIdMiddleware(app_for(backend))
    with capture_logs() as logs:
        await request(outer, headers=[(b"x-request-id", b"0f7e1cd5c7d24e6f9d0c3b5a6e8f1a2b")])
    assert logs[0]["request_id"] == "0f7e1cd5c7d24e6f9d0c3b5a6e8f1a2b"


@pytest.mark.parametrize(
    "hostile", [b"\x1b[31mred\x1b[0m", b"x" * 300, b'say "hi"'], ids=["ansi", "long", "quotes"]
)
async def test_an_unchecked_asgi_correlation_id_is_replaced_never_logged(
    backend: Backend, hostile: bytes
) -> None:
    """asgi-correlation-id with ``validator=None`` passes any header on: it gets the same
    check as X-Request-ID."""
    from asgi_correlation_id import CorrelationIdMiddleware

    outer = CorrelationIdMiddleware(app_for(backend), validator=None)
    with capture_logs() as logs:
        await request(outer, headers=[(b"x-request-id", hostile)])
    (closed,) = logs
    assert closed["request_id"] != hostile.decode()
    assert len(closed["request_id"]) == 32
    assert hostile.decode() not in repr(logs)
