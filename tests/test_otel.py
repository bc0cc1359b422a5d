"""OpenTelemetry: one db.session span per request session, child of the request span."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import opentelemetry.trace
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from sessionscope import DBSessionMiddleware
from sessionscope._otel import SessionSpans

from .support import Backend, children, request

pytestmark = pytest.mark.anyio


@pytest.fixture
def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def writing_app(backend: Backend, status: int = 201, fail: bool = False) -> Any:
    """Writes one row (or, with ``fail``, one that fails at commit), then answers ``status``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        if fail:
            statement = children.insert().values(id=1, parent_id=3)
            await backend.run(session, lambda s: s.execute(statement))
        else:
            await backend.insert(session, "traced")
        await send({"type": "http.response.start", "status": status})
        await send({"type": "http.response.body"})

    return app


def traced_app(backend: Backend, provider: TracerProvider, status: int, fail: bool = False) -> Any:
    inner = DBSessionMiddleware(
        writing_app(backend, status, fail),
        engine=backend.engine,
        registry=CollectorRegistry(),
        tracer_provider=provider,
    )
    tracer = provider.get_tracer("test")

    async def with_request_span(scope: Any, receive: Any, send: Any) -> None:
        with tracer.start_as_current_span("GET /items"):
            await inner(scope, receive, send)

    return with_request_span


async def test_a_request_session_is_one_span_under_the_request_span(
    backend: Backend, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    await request(traced_app(backend, provider, 201))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    session_span = spans["db.session"]
    assert session_span.parent is not None
    assert session_span.parent.span_id == spans["GET /items"].context.span_id
    assert session_span.attributes == {
        "db.session.name": "default",
        "db.session.outcome": "commit",
        "db.session.statements": 1,
        "http.response.status_code": 201,
    }


async def test_the_span_tells_a_rollback_and_its_reason(
    backend: Backend, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    await request(traced_app(backend, provider, 409))
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "db.session"]
    assert span.attributes is not None
    assert span.attributes["db.session.outcome"] == "rollback"
    assert span.attributes["db.session.reason"] == "status_4xx"


async def test_a_failed_commit_marks_the_span_as_an_error(
    backend: Backend, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    await request(traced_app(backend, provider, 200, fail=True))
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "db.session"]
    assert span.status.status_code is StatusCode.ERROR


async def test_without_a_configured_tracer_provider_no_spans_are_made(backend: Backend) -> None:
    middleware = DBSessionMiddleware(
        lambda *a: None, engine=backend.engine, registry=CollectorRegistry()
    )
    assert middleware.settings.reporter.spans is None


async def test_the_global_tracer_provider_is_used_when_none_is_passed(
    backend: Backend,
    traced: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, exporter = traced
    # The real global can be set once per process only: what get_tracer_provider() returns
    # after opentelemetry.trace.set_tracer_provider(provider), for this test alone.
    monkeypatch.setattr(opentelemetry.trace, "get_tracer_provider", lambda: provider)

    middleware = DBSessionMiddleware(
        writing_app(backend), engine=backend.engine, registry=CollectorRegistry()
    )
    assert middleware.settings.reporter.spans is not None
    assert (await request(middleware)).status == 201
    (span,) = exporter.get_finished_spans()
    assert span.name == "db.session"
    assert span.attributes is not None
    assert span.attributes["db.session.outcome"] == "commit"
    assert span.attributes["db.session.statements"] == 1


async def test_without_the_opentelemetry_package_there_are_no_spans_and_requests_work(
    backend: Backend,
    traced: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, exporter = traced
    # As if the otel extra were not installed: importing opentelemetry raises ImportError.
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        importlib.import_module("opentelemetry.trace")
    assert SessionSpans.create() is None
    assert SessionSpans.create(provider) is None

    middleware = DBSessionMiddleware(
        writing_app(backend),
        engine=backend.engine,
        registry=CollectorRegistry(),
        tracer_provider=provider,
    )
    assert middleware.settings.reporter.spans is None
    assert (await request(middleware)).status == 201
    assert backend.names() == ["traced"]
    assert exporter.get_finished_spans() == ()
