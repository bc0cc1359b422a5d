"""OpenTelemetry: one ``db.session`` span per request session (``sessionscope[otel]``).

The span starts when the request creates its session and ends when the session closes, as a
child of whatever span is current then (the request span of OpenTelemetry's ASGI
instrumentation). It carries the outcome, the rollback reason, the statement count and the
final status; a failed commit marks it as an error. Without a configured tracer provider (or
without the ``opentelemetry-api`` package) nothing is created: no cost.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._record import SessionRecord

SPAN_NAME = "db.session"


class SessionSpans:
    """Starts and ends the span of each request session."""

    def __init__(self, provider: Any) -> None:
        self._tracer = provider.get_tracer("sessionscope")
        self._trace = importlib.import_module("opentelemetry.trace")

    @classmethod
    def create(cls, provider: Any = None) -> SessionSpans | None:
        """Spans from ``provider`` (default: the global one), or ``None`` when not configured."""
        try:
            trace = importlib.import_module("opentelemetry.trace")
        except ImportError:  # the otel extra is not installed
            return None
        if provider is None:
            provider = trace.get_tracer_provider()
            if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                return None
        return cls(provider)

    def start(self, db: str) -> Any:
        """A started span for a new session of database ``db``."""
        return self._tracer.start_span(
            SPAN_NAME, kind=self._trace.SpanKind.INTERNAL, attributes={"db.session.name": db}
        )

    def end(self, span: Any, rs: SessionRecord) -> None:
        """Record how the session ended and end its span."""
        attributes = {
            "db.session.outcome": rs.outcome or "unused",
            "db.session.statements": rs.statements,
        }
        if rs.reason is not None:
            attributes["db.session.reason"] = rs.reason
        if rs.status is not None:
            attributes["http.response.status_code"] = rs.status
        span.set_attributes(attributes)
        if rs.reason == "commit_error":
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "commit failed"))
        span.end()
