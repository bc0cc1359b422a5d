"""Property: whatever legal sequence of ASGI messages an application sends, the client sees a
well-formed response, and the request's writes are committed exactly when the status the client
saw passes ``commit_on``.

Hypothesis draws the application: its status, whether it writes (and whether the write only
fails at COMMIT, through a deferred foreign key), how many streamed chunks it sends, where it
raises (before the start, after it, mid-body, after the last body) and what it does after the
body (a read, an explicitly committed write, a forgotten write). Starlette's
``ServerErrorMiddleware`` sits outside, as in every Starlette/FastAPI application.
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
from starlette.middleware.errors import ServerErrorMiddleware

from sessionscope import DBSessionMiddleware

from ..support import Backend, children, http_scope, items, make_backend

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
BACKGROUND = [None, "read", "write_commit", "write_forgotten"]


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


def planned_app(backend: Backend, plan: Plan) -> Any:
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
        await send(
            {"type": "http.response.start", "status": plan.status, "headers": [(b"x-app", b"1")]}
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

    return app


@pytest.fixture(params=["sqlite-sync", "sqlite-async"])
async def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    db = make_backend(request.param, tmp_path_factory.mktemp("protocol"))
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
    app = ServerErrorMiddleware(
        DBSessionMiddleware(
            planned_app(backend, plan),
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
    assert "background-forgotten" not in in_db
    reached_background = plan.raise_at is None
    assert ("background-committed" in in_db) == (
        reached_background and plan.background == "write_commit"
    )
    assert backend.checkedout() == 0
