"""Hostile input: what a client sends never grows the metrics, never reaches a log line raw,
and secrets (SQL parameters, the database password) never leave through logs, metrics or
error responses."""

from __future__ import annotations

import os
import random
import string
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware

from ..support import Backend, children, items, make_backend
from .fault_proxy import FaultProxy
from .helpers import (
    SCHEMA,
    VALID_REQUEST_ID,
    Client,
    checkedout,
    db_session_events,
    dispose,
    pg_engine,
    render_events,
    series_count,
)

pytestmark = pytest.mark.anyio

RANDOM_REQUESTS = 10_000
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "X"]


def item_app(backend: Backend, registry: CollectorRegistry) -> Starlette:
    async def get_item(request: Request) -> Response:
        session = request.state.db
        await backend.count(session)
        return JSONResponse({"id": request.path_params["item_id"]})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/items/{item_id}", get_item, methods=["GET", "POST"]),
            Route("/health", health),
        ],
        middleware=[Middleware(DBSessionMiddleware, engine=backend.engine, registry=registry)],
    )


def random_path(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-_.~%/!$&'()*+,;=:@"
    tail = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
    roll = rng.random()
    if roll < 0.1:
        return f"/items/{tail.replace('/', '')}"  # the route, with a random id
    if roll < 0.15:
        return "/health/" + tail
    return "/" + tail


@pytest.fixture
async def sqlite(tmp_path: Any) -> Any:
    backend = make_backend("sqlite-async", tmp_path)
    try:
        yield backend
    finally:
        await backend.dispose()


async def test_random_paths_and_methods_add_no_metric_series(sqlite: Backend) -> None:
    registry = CollectorRegistry()
    client = Client(item_app(sqlite, registry))
    # warm-up: every route and an unmatched path, every outcome the scan below can produce
    for path, method in [
        ("/items/1", "GET"),
        ("/items/1", "DELETE"),
        ("/health", "GET"),
        ("/nope", "GET"),
    ]:
        await client.call(path, method=method)
    before = series_count(registry)
    text_before = generate_latest(registry).decode()
    rng = random.Random(20240601)
    statuses: set[int | None] = set()
    for _ in range(RANDOM_REQUESTS):
        outcome = await client.call(random_path(rng), method=rng.choice(METHODS))
        statuses.add(outcome.status)
    after = series_count(registry)
    assert {200, 404, 405} <= statuses
    assert after == before, "\n".join(
        sorted(set(generate_latest(registry).decode().splitlines()) - set(text_before.split("\n")))
    )
    assert sqlite.checkedout() == 0


HOSTILE_REQUEST_IDS = [
    "a" * 129,
    "b" * 10_000,
    "forged\nlevel=error event=db_session.commit_failed",
    "carriage\rreturn",
    "\x1b[31mred\x1b[0m",
    "with space",
    '{"json": "injection"}',
    "ünïcødé",
    "../../etc/passwd",
    "%0d%0aSet-Cookie:x",
    "semi;colon",
    "null\x00byte",
    "<script>alert(1)</script>",
    "",
]


@pytest.mark.parametrize("raw", HOSTILE_REQUEST_IDS, ids=lambda r: repr(r[:20]))
async def test_malformed_or_oversized_request_ids_are_replaced_and_never_logged(
    sqlite: Backend, raw: str
) -> None:
    client = Client(item_app(sqlite, CollectorRegistry()))
    with capture_logs() as logs:
        for _ in range(2):  # the same hostile value twice
            await client.call("/items/7", headers=[(b"x-request-id", raw.encode())])
    events = db_session_events(logs)
    assert events, "the requests logged no db_session event"
    for event in events:
        # not the value cut down to a valid length ("a" * 128) or any other piece of it
        assert event["request_id"] not in raw, event["request_id"]
        assert VALID_REQUEST_ID.fullmatch(event["request_id"]), event["request_id"]
    # replaced by a fresh id per request, not derived from the value (a cleaned-up copy,
    # "carriagereturn" for "carriage\rreturn", would be the same both times)
    assert len({e["request_id"] for e in events}) == 2, events
    rendered = render_events(logs)
    if len(raw) >= 4:
        assert raw not in rendered
    if len(raw) > 128:
        assert raw[:128] not in rendered  # nor its longest valid-length prefix, anywhere
    for fragment in ("\n", "\r", "\x1b", "\x00"):
        assert all(fragment not in str(v) for e in events for v in e.values())


async def test_a_well_formed_request_id_is_kept(sqlite: Backend) -> None:
    client = Client(item_app(sqlite, CollectorRegistry()))
    with capture_logs() as logs:
        await client.call("/items/7", headers=[(b"x-request-id", b"req-123.abc:9_Z")])
    assert {e["request_id"] for e in db_session_events(logs)} == {"req-123.abc:9_Z"}


# -------------------------------------------------------------------------------- secrets

SECRET_ROLE = f"ss_secret_{os.getpid()}"
"""Roles are the whole server's: one per test process, so suites run at once never share it."""
SECRET_PASSWORD = "S3cr3t-pw-4f9c2a7e1b"  # what an attacker would want from a log line
SECRET_NAME = "param-d41d8cd98f00b204"
"""A value bound as a SQL parameter: it must never be echoed."""
SECRET_PARENT = 918273645


@pytest.fixture
def secret_url(pg_url: str, check: Engine) -> Iterator[str]:
    """A URL with a password in it, for a role that can use the suite's tables; the role is
    dropped afterwards."""
    with check.begin() as conn:
        exists = conn.execute(
            sa.text("select 1 from pg_roles where rolname = :r"), {"r": SECRET_ROLE}
        ).scalar()
        verb = "alter" if exists else "create"
        conn.execute(sa.text(f"{verb} role {SECRET_ROLE} login password '{SECRET_PASSWORD}'"))
        conn.execute(sa.text(f"grant usage on schema {SCHEMA} to {SECRET_ROLE}"))
        conn.execute(sa.text(f"grant all on all tables in schema {SCHEMA} to {SECRET_ROLE}"))
        conn.execute(sa.text(f"grant all on all sequences in schema {SCHEMA} to {SECRET_ROLE}"))
    url = make_url(pg_url).set(username=SECRET_ROLE, password=SECRET_PASSWORD, host="127.0.0.1")
    yield url.render_as_string(hide_password=False)
    with check.begin() as conn:
        conn.execute(sa.text(f"drop owned by {SECRET_ROLE}"))
        conn.execute(sa.text(f"drop role {SECRET_ROLE}"))


def secret_app(engine: Engine | AsyncEngine, registry: CollectorRegistry) -> Starlette:
    """Routes whose failures carry secrets in their SQL parameters."""

    async def run(session: Any, fn: Any) -> Any:
        if isinstance(session, AsyncSession):
            return await session.run_sync(fn)
        return await anyio.to_thread.run_sync(fn, session)

    async def duplicate_at_commit(request: Request) -> Response:
        """An ORM object flushed only at COMMIT, violating a unique constraint."""

        class Base(sa.orm.DeclarativeBase):
            pass

        class Item(Base):
            __table__ = items

        request.state.db.add(Item(name=SECRET_NAME))
        return JSONResponse({"ok": True}, status_code=201)

    async def orphan_at_commit(request: Request) -> Response:
        """A deferred foreign key that fails at COMMIT, naming the parameter in its DETAIL."""
        await run(
            request.state.db,
            lambda s: s.execute(children.insert().values(id=1, parent_id=SECRET_PARENT)),
        )
        return JSONResponse({"ok": True}, status_code=201)

    async def bad_value_at_commit(request: Request) -> Response:
        """An ORM object flushed at COMMIT whose value the database cannot convert: the
        driver's first error line quotes the value."""

        class Base(sa.orm.DeclarativeBase):
            pass

        class Child(Base):
            __table__ = children

        request.state.db.add(Child(id=1, parent_id=SECRET_NAME))
        return JSONResponse({"ok": True}, status_code=201)

    async def failing_statement(request: Request) -> Response:
        """A statement that fails in the application (unhandled: Starlette answers 500)."""
        await run(request.state.db, lambda s: s.execute(items.insert().values(name=SECRET_NAME)))
        return JSONResponse({"ok": True}, status_code=201)

    return Starlette(
        routes=[
            Route("/duplicate", duplicate_at_commit, methods=["POST"]),
            Route("/orphan", orphan_at_commit, methods=["POST"]),
            Route("/bad-value", bad_value_at_commit, methods=["POST"]),
            Route("/statement", failing_statement, methods=["POST"]),
        ],
        middleware=[Middleware(DBSessionMiddleware, engine=engine, registry=registry)],
    )


def around(text: str, secret: str) -> str:
    """Every place ``secret`` occurs in ``text``, with some context (for the failure message)."""
    found, start = [], text.find(secret)
    while start != -1:
        found.append(repr(text[max(0, start - 160) : start + len(secret) + 40]))
        start = text.find(secret, start + 1)
    return "\n".join(found)


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["pg-sync", "pg-async"])
@pytest.mark.parametrize("path", ["/duplicate", "/orphan", "/bad-value", "/statement"])
async def test_sql_parameters_and_the_password_never_reach_logs_metrics_or_responses(
    kind: str, path: str, secret_url: str, check: Engine, app_name: str
) -> None:
    with check.begin() as conn:
        conn.execute(items.insert().values(name=SECRET_NAME))  # so writing it again fails
    engine = pg_engine(secret_url, async_=kind == "pg-async", application_name=app_name)
    registry = CollectorRegistry()
    client = Client(secret_app(engine, registry))
    try:
        with capture_logs() as logs:
            outcome = await client.call(path, method="POST")
        assert outcome.status == 500
        outcome.exchange.assert_well_formed()
        leaks = {
            "response": outcome.body.decode("latin-1") + str(outcome.headers),
            "logs": render_events(logs),
            "metrics": generate_latest(registry).decode(),
        }
        for where, text in leaks.items():
            for secret in (SECRET_PASSWORD, SECRET_NAME, str(SECRET_PARENT)):
                assert secret not in text, f"{secret!r} leaked into the {where}: " + around(
                    text, secret
                )
        if path == "/statement":
            # the application's own error: Starlette answers 500 and re-raises it to the server
            assert isinstance(outcome.error, sa.exc.IntegrityError), repr(outcome.error)
        else:
            # failed at COMMIT: the middleware answered, nothing escaped to the server
            assert outcome.error is None, repr(outcome.error)
            assert outcome.body == b'{"detail": "Internal Server Error"}'
        assert checkedout(engine) == 0
    finally:
        await dispose(engine)


@pytest.mark.postgres
async def test_an_unreachable_database_does_not_leak_the_password(
    secret_url: str, check: Engine, app_name: str
) -> None:
    url = make_url(secret_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        engine = pg_engine(
            secret_url,
            async_=False,
            application_name=app_name,
            host=proxy.host,
            port=proxy.port,
        )
        proxy.refuse()
        client = Client(secret_app(engine, CollectorRegistry()))
        try:
            with capture_logs() as logs:
                outcome = await client.call("/orphan", method="POST")
            assert outcome.status == 500
            assert SECRET_PASSWORD not in render_events(logs)
            assert SECRET_PASSWORD not in outcome.body.decode()
            assert SECRET_PASSWORD not in repr(outcome.error)
        finally:
            await dispose(engine)
