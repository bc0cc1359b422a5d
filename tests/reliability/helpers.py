"""Helpers for the reliability suite: engines behind the fault proxy, a client that records
everything the client saw (even when the application raised), and server-side checks."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..support import ASGIApp, Exchange, Message, driver_url, http_scope, request

SCHEMA = "ss_reliability"
"""The suite's own schema: its tables never collide with other tests run at the same time."""

# -------------------------------------------------------------------------------- engines


def pg_engine(
    url: str,
    *,
    async_: bool,
    application_name: str,
    host: str | None = None,
    port: int | None = None,
    connect_timeout: float = 2.0,
    command_timeout: float | None = None,
    **engine_kw: Any,
) -> Engine | AsyncEngine:
    """An engine on the test database, optionally through ``host:port`` (the fault proxy).

    Every connection carries ``application_name`` so ``pg_stat_activity`` shows only ours.
    """
    target = make_url(driver_url(url, async_=async_))
    if host is not None:
        target = target.set(host=host, port=port)
    connect_args: dict[str, Any]
    if async_:
        connect_args = {
            "server_settings": {"application_name": application_name, "search_path": SCHEMA},
            "timeout": connect_timeout,
        }
        if command_timeout is not None:
            connect_args["command_timeout"] = command_timeout
        return create_async_engine(target, connect_args=connect_args, **engine_kw)
    connect_args = {
        "application_name": application_name,
        "options": f"-c search_path={SCHEMA}",
        "connect_timeout": max(1, round(connect_timeout)),
    }
    return sa.create_engine(target, connect_args=connect_args, **engine_kw)


def sync_engine_of(engine: Engine | AsyncEngine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine


def checkedout(engine: Engine | AsyncEngine) -> int:
    """Connections the engine's pool has handed out and not got back."""
    return int(sync_engine_of(engine).pool.checkedout())  # type: ignore[attr-defined]


async def dispose(engine: Engine | AsyncEngine) -> None:
    if isinstance(engine, AsyncEngine):
        await engine.dispose()
    else:
        engine.dispose()


def backend_states(check: Engine, application_name: str) -> dict[str, int]:
    """``pg_stat_activity`` states of our application's server backends."""
    with check.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select coalesce(state, 'unknown'), count(*) from pg_stat_activity "
                "where application_name = :name and pid <> pg_backend_pid() group by 1"
            ),
            {"name": application_name},
        ).all()
    return {str(state): int(count) for state, count in rows}


def idle_in_transaction(check: Engine, application_name: str) -> int:
    """Our backends sitting ``idle in transaction`` (or ``... (aborted)``)."""
    states = backend_states(check, application_name)
    return sum(n for state, n in states.items() if state.startswith("idle in transaction"))


async def wait_until_no_idle_in_transaction(
    check: Engine, application_name: str, within: float = 5.0
) -> int:
    """Bounded wait for the server to see our last sessions end; returns the final count.

    A backend whose client went away finishes its statement before it notices, so the server
    may lag the client by the length of that statement.
    """
    await poll_until(lambda: idle_in_transaction(check, application_name) == 0, within=within)
    return idle_in_transaction(check, application_name)


async def poll_until(done: Callable[[], bool], *, within: float, every: float = 0.05) -> bool:
    """Bounded poll of server-side state, which offers no event to await; ``done`` runs in a
    worker thread so the event loop keeps serving while it queries."""
    with anyio.move_on_after(within):
        while True:
            if await anyio.to_thread.run_sync(done):
                return True
            await anyio.sleep(every)
    return False


# --------------------------------------------------------------------------------- client


@dataclass
class Outcome:
    """What the client saw for one request, and what the application raised (if anything)."""

    messages: list[Message]
    error: BaseException | None = None
    elapsed: float = 0.0
    marker: str = ""

    @property
    def exchange(self) -> Exchange:
        return Exchange(self.messages)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) <= 1, self.messages
        return int(starts[0]["status"]) if starts else None

    @property
    def headers(self) -> dict[str, str]:
        return self.exchange.headers

    @property
    def body(self) -> bytes:
        return self.exchange.body


@dataclass
class Client:
    """Calls an ASGI app the way a server does; never raises what the app raised."""

    app: ASGIApp
    outcomes: list[Outcome] = field(default_factory=list)

    async def call(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        marker: str = "",
        query: str = "",
    ) -> Outcome:
        messages: list[Message] = []
        outcome = Outcome(messages, marker=marker)
        started = time.perf_counter()
        scope = http_scope(path, method, headers)
        scope["query_string"] = query.encode()
        try:
            await request(self.app, body=body, scope=scope, messages=messages)
        except Exception as exc:
            outcome.error = exc
        finally:
            outcome.elapsed = time.perf_counter() - started
        self.outcomes.append(outcome)
        return outcome


# ------------------------------------------------------------------------------- process


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``), 0 where unavailable."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------- logs

_RENDER = structlog.processors.JSONRenderer(default=repr)
_FORMAT_EXC = structlog.processors.format_exc_info


def render_event(event: MutableMapping[str, Any]) -> str:
    """One captured event as a production JSON log line would print it (tracebacks included)."""
    formatted = _FORMAT_EXC(None, "", dict(event))
    rendered = _RENDER(None, "", formatted)
    return rendered if isinstance(rendered, str) else rendered.decode()


def render_events(events: list[MutableMapping[str, Any]]) -> str:
    return "\n".join(render_event(e) for e in events)


VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def db_session_events(
    events: list[MutableMapping[str, Any]],
) -> list[MutableMapping[str, Any]]:
    return [e for e in events if str(e.get("event", "")).startswith("db_session.")]


# ------------------------------------------------------------------------------- metrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """One sample's value (``db="default"`` unless given), ``None`` if it is not exported."""
    labels.setdefault("db", "default")
    return registry.get_sample_value(name, labels)


def series_count(registry: CollectorRegistry) -> int:
    """Number of time series a scrape of ``registry`` returns."""
    text = generate_latest(registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


async def wait_until_quiet(check: Engine, application_name: str, within: float = 5.0) -> int:
    """Bounded wait until none of our backends is running a statement; then the number of
    our backends left ``idle in transaction`` (what a leaked transaction looks like)."""

    def busy() -> bool:
        return backend_states(check, application_name).get("active", 0) > 0

    await poll_until(lambda: not busy(), within=within)
    return await wait_until_no_idle_in_transaction(check, application_name, within=1.0)


async def wait_for_statement(
    check: Engine, application_name: str, fragment: str, within: float = 5.0
) -> None:
    """Bounded wait until one of our backends is running a statement containing ``fragment``."""

    def running() -> bool:
        with check.connect() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "select count(*) from pg_stat_activity where application_name = :n "
                        "and state = 'active' and query like :q"
                    ),
                    {"n": application_name, "q": f"%{fragment}%"},
                ).scalar()
            )

    assert await poll_until(running, within=within, every=0.01), f"{fragment!r} never ran"
