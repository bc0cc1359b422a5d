"""Property: whatever legal sequence of ASGI messages an application sends, the client sees a
well-formed response, and the request's writes are committed exactly when the status the client
saw passes ``commit_on``.

Hypothesis draws the application: its status, whether it writes (and whether the write only
fails at COMMIT, through a deferred foreign key), how many streamed chunks it sends, where it
raises (before the start, after it, mid-body, after the last body) and what it does after the
body: a read, an explicitly committed write, a forgotten write, or a real Starlette
``BackgroundTask`` (run by a ``StreamingResponse`` after its last body) that writes and then
commits or forgets. Starlette's ``ServerErrorMiddleware`` sits outside, as in every
Starlette/FastAPI application. The property runs on SQLite and on PostgreSQL (psycopg and
asyncpg), sync and async alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.responses import StreamingResponse

from sessionscope import DBSessionMiddleware

from ..support import Backend, children, http_scope, items, make_backend
from .helpers import pg_engine

pytestmark = pytest.mark.anyio

POLICIES: dict[str, Callable[[int], bool]] = {
    "below_400": lambda status: status < 400,
    "only_2xx": lambda status: 200 <= status < 300,
    "below_500": lambda status: status < 500,
    "200_or_409": lambda status: status in (200, 409),
}
"""``commit_on`` policies; none commits a 5xx (the 500 sent for an unhandled error is outside
the middleware and never decides anything)."""
STATUSES = [200, 201, 204, 301, 304, 400, 404, 409, 422, 500, 503]
RAISE_POINTS = [None, "before_start", "after_start", "mid_body", "after_body"]
"""Where the application raises (``None``: it does not)."""
BACKGROUND = [
    None,
    "read",
    "write_commit",
    "write_forgotten",
    "task_write_commit",
    "task_write_forgotten",
]
"""Work after the last body: on the request session directly, or (``task_*``) in a Starlette
``BackgroundTask`` the response runs."""
TASKS = {"task_write_commit": True, "task_write_forgotten": False}
"""Background choices run as a ``BackgroundTask``, and whether the task commits its write."""


class AppError(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    status: int
    write: bool
    write_fails_at_commit: bool
    chunks: int
    raise_at: str | None
    background: str | None
    policy: str


plans = st.builds(
    Plan,
    status=st.sampled_from(STATUSES),
    write=st.booleans(),
    write_fails_at_commit=st.booleans(),
    chunks=st.integers(min_value=0, max_value=3),
    raise_at=st.sampled_from(RAISE_POINTS),
    background=st.sampled_from(BACKGROUND),
    policy=st.sampled_from(sorted(POLICIES)),
)


def planned_app(backend: Backend, plan: Plan, trace: list[str]) -> Any:
    """The application ``plan`` describes; it appends its background choice to ``trace`` once
    that work is done."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        if plan.write:
            await backend.insert(session, "request-write")
        if plan.write_fails_at_commit:
            # a child without a parent: the deferred foreign key fails only at COMMIT
            await backend.run(
                session, lambda s: s.execute(children.insert().values(id=1, parent_id=99))
            )
        if plan.raise_at == "before_start":
            raise AppError("before start")
        if plan.background in TASKS:
            task = background_task(session, commit=TASKS[plan.background], trace=trace)
            response = StreamingResponse(
                streamed_body(plan),
                status_code=plan.status,
                headers={"x-app": "1"},
                background=task,
            )
            await response(scope, receive, send)  # the body, then the task
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": plan.status,
                    "headers": [(b"x-app", b"1")],
                }
            )
            if plan.raise_at == "after_start":
                raise AppError("after start")
            for i in range(plan.chunks):
                await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
                if plan.raise_at == "mid_body" and i == 0:
                    raise AppError("mid body")
            await send({"type": "http.response.body", "body": b"end", "more_body": False})
        if plan.raise_at in ("after_body", "mid_body"):
            raise AppError("after body")
        if plan.background == "read":
            await backend.count(session)
        elif plan.background == "write_commit":
            await backend.insert(session, "background-committed")
            await backend.run(session, lambda s: s.commit())
        elif plan.background == "write_forgotten":
            await backend.insert(session, "background-forgotten")
        if plan.background is not None and plan.background not in TASKS:
            trace.append(plan.background)

    return app


async def streamed_body(plan: Plan) -> AsyncIterator[bytes]:
    """The chunks of a ``StreamingResponse``, raising where ``plan`` says (the response sent
    its start before it asks for the first chunk)."""
    if plan.raise_at == "after_start":
        raise AppError("after start")
    for i in range(plan.chunks):
        yield b"chunk"
        if plan.raise_at == "mid_body" and i == 0:
            raise AppError("mid body")


def background_task(session: Any, *, commit: bool, trace: list[str]) -> BackgroundTask:
    """A Starlette ``BackgroundTask`` that writes through the request session, as handlers
    write them: a coroutine for an ``AsyncSession``, a function Starlette runs in its thread
    pool for a ``Session``."""
    name = "task-committed" if commit else "task-forgotten"
    done = "task_write_commit" if commit else "task_write_forgotten"
    if isinstance(session, AsyncSession):

        async def write_async() -> None:
            await session.execute(items.insert().values(name=name))
            if commit:
                await session.commit()
            trace.append(done)

        return BackgroundTask(write_async)

    def write_sync() -> None:
        session.execute(items.insert().values(name=name))
        if commit:
            session.commit()
        trace.append(done)

    return BackgroundTask(write_sync)


def background_runs(plan: Plan) -> bool:
    """Whether the application gets as far as its work after the last body: it must not raise
    before. A ``StreamingResponse`` runs its task before the application's own code after the
    response, so an ``after_body`` raise (or a ``mid_body`` one with no chunk to raise after)
    comes too late to stop it."""
    if plan.background in TASKS:
        return plan.raise_at in (None, "after_body") or (
            plan.raise_at == "mid_body" and plan.chunks == 0
        )
    return plan.raise_at is None


@pytest.fixture(
    params=[
        "sqlite-sync",
        "sqlite-async",
        pytest.param("pg-sync", marks=pytest.mark.postgres),
        pytest.param("pg-async", marks=pytest.mark.postgres),
    ]
)
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    """SQLite in a temporary file, or PostgreSQL (fresh tables in the suite's schema)."""
    kind: str = request.param
    if kind.startswith("sqlite"):
        db = make_backend(kind, tmp_path_factory.mktemp("protocol"))
    else:
        engine = pg_engine(
            request.getfixturevalue("pg_url"),
            async_=kind == "pg-async",
            application_name=request.getfixturevalue("app_name"),
        )
        db = Backend(kind, engine, request.getfixturevalue("check"))
    try:
        yield db
    finally:
        await db.dispose()


def clear(backend: Backend) -> None:
    with backend.check.begin() as conn:
        conn.execute(children.delete())
        conn.execute(items.delete())


def names(backend: Backend) -> set[str]:
    return set(backend.names())


@settings(
    max_examples=150,
    database=None,  # no example database written into the checkout
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=plans)
async def test_client_sees_a_well_formed_response_and_commit_matches_the_status_it_saw(
    backend: Backend, plan: Plan
) -> None:
    clear(backend)
    policy = POLICIES[plan.policy]
    trace: list[str] = []
    app = ServerErrorMiddleware(
        DBSessionMiddleware(
            planned_app(backend, plan, trace),
            engine=backend.engine,
            commit_on=policy,
            registry=CollectorRegistry(),
        )
    )
    messages: list[dict[str, Any]] = []
    finished = anyio.Event()

    async def receive() -> MutableMapping[str, Any]:
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(dict(message))

    raised: BaseException | None = None
    try:
        await app(http_scope("/", "POST"), receive, send)
    except AppError as exc:
        raised = exc
    finally:
        finished.set()

    # -- the client's view: one start, bodies after it, nothing after the last one ----------
    types = [m["type"] for m in messages]
    assert types, plan  # an application error before the start still becomes a 500
    assert types[0] == "http.response.start", types
    assert types.count("http.response.start") == 1, types
    assert all(t == "http.response.body" for t in types[1:]), types
    assert all(m.get("more_body", False) for m in messages[1:-1]), messages
    seen = int(messages[0]["status"])
    replaced = dict(messages[0].get("headers", [])).get(b"x-app") is None
    complete = len(messages) > 1 and not messages[-1].get("more_body", False)
    if not complete:
        # only an application that failed after starting its response leaves it unfinished
        assert plan.raise_at in ("after_start", "mid_body"), (plan, messages)
        assert raised is not None
        assert not replaced
    if replaced:  # the middleware's (or Starlette's) complete 500, never exception text
        assert seen == 500, messages
        assert complete
        body = b"".join(m.get("body", b"") for m in messages[1:])
        assert b"AppError" not in body
        assert b"before start" not in body

    # -- the database's view: committed iff the status the client saw passes commit_on --------
    in_db = names(backend)
    committed = "request-write" in in_db
    if plan.write:
        assert committed == policy(seen), (plan, seen, in_db)
    else:
        assert not committed
    with backend.check.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(children)).scalar() == 0
    # work after the decision: kept only when committed explicitly, never by the middleware
    runs = background_runs(plan)
    assert trace == ([plan.background] if runs and plan.background else []), (plan, trace)
    assert "background-forgotten" not in in_db
    assert "task-forgotten" not in in_db
    assert ("background-committed" in in_db) == (runs and plan.background == "write_commit")
    assert ("task-committed" in in_db) == (runs and plan.background == "task_write_commit")
    assert backend.checkedout() == 0
