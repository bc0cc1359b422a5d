"""Per-task sessions inside one request: ``task_session`` and ``gather_with_sessions``.

Tasks really run at the same time (they wait for each other at a barrier while holding their
sessions' connections), on every backend; the ``backend`` fixture checks that every connection
is back in the pool afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.requests import Request
from structlog.testing import capture_logs

from sessionscope import ConfigurationError, DBSessionMiddleware, SessionNotAvailableError
from sessionscope.tasks import gather_with_sessions, task_session

from .metric_support import value
from .support import Backend, backend_for, http_scope, items, request

pytestmark = pytest.mark.anyio

TASKS = 3


@pytest.fixture(params=["sqlite-async", "pg-async"])
async def async_backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    """The async databases only; no connection may stay checked out."""
    async with backend_for(request.param, tmp_path) as db:
        yield db


def endpoint(
    backend: Backend, body: Any, registry: CollectorRegistry | None = None
) -> DBSessionMiddleware:
    """An app that runs ``await body(scope)`` and answers 200 (or what ``body`` returns)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        status = await body(scope) or 200
        await send({"type": "http.response.start", "status": status})
        await send({"type": "http.response.body"})

    return DBSessionMiddleware(app, engine=backend.engine, registry=registry or CollectorRegistry())


def concurrent_writers(backend: Backend, seen: list[Any], checked_out: list[int]) -> list[Any]:
    """``TASKS`` functions that each meet the others while holding a connection, then write.

    Plain functions (run in worker threads) for a sync database, coroutines for an async one.
    On SQLite the barrier comes after a read, before the write: SQLite lets one writer at a
    time, and a writer waiting at the barrier would lock the others out.
    """
    count = sa.select(sa.func.count()).select_from(items)
    if backend.is_async:
        arrived = 0
        everyone = anyio.Event()

        async def meet() -> None:
            nonlocal arrived
            arrived += 1
            if arrived == TASKS:
                checked_out.append(backend.checkedout())
                everyone.set()
            with anyio.fail_after(10):
                await everyone.wait()

        def make_async(i: int) -> Any:
            async def work(session: AsyncSession) -> str:
                seen.append(session)
                await session.execute(count)
                await meet()
                await session.execute(items.insert().values(name=f"t{i}"))
                return f"t{i}"

            return work

        return [make_async(i) for i in range(TASKS)]

    barrier = threading.Barrier(
        TASKS, timeout=10, action=lambda: checked_out.append(backend.checkedout())
    )

    def make_sync(i: int) -> Any:
        def work(session: Session) -> str:
            seen.append(session)
            session.execute(count)
            barrier.wait()
            session.execute(items.insert().values(name=f"t{i}"))
            return f"t{i}"

        return work

    return [make_sync(i) for i in range(TASKS)]


async def test_concurrent_tasks_each_get_their_own_session_and_their_writes_land(
    backend: Backend,
) -> None:
    seen: list[Any] = []
    checked_out: list[int] = []
    results: list[Any] = []
    request_sessions: list[Any] = []

    async def body(scope: Any) -> None:
        request_sessions.append(scope["state"]["db"])
        fns = concurrent_writers(backend, seen, checked_out)
        results.extend(await gather_with_sessions(Request(scope), *fns))

    assert (await request(endpoint(backend, body))).status == 200
    assert results == ["t0", "t1", "t2"]
    assert len({id(s) for s in seen}) == TASKS
    assert request_sessions[0] not in seen
    expected_type = AsyncSession if backend.is_async else Session
    assert all(isinstance(s, expected_type) for s in seen)
    assert checked_out == [TASKS]  # all three held a connection at the same moment
    assert backend.names() == ["t0", "t1", "t2"]


async def test_results_come_back_in_argument_order_whatever_order_tasks_finish(
    backend: Backend,
) -> None:
    results: list[Any] = []

    def make(i: int) -> Any:
        if backend.is_async:

            async def work(session: AsyncSession) -> int:
                await anyio.sleep(0.01 * (TASKS - i))
                return int((await session.execute(sa.select(sa.literal(i)))).scalar_one())

            return work

        def work_sync(session: Session) -> int:
            return int(session.execute(sa.select(sa.literal(i))).scalar_one())

        return work_sync

    async def body(scope: Any) -> None:
        results.extend(await gather_with_sessions(scope, *(make(i) for i in range(TASKS))))

    await request(endpoint(backend, body))
    assert results == list(range(TASKS))


async def test_task_sessions_are_counted_in_the_metrics_like_request_sessions(
    backend: Backend,
) -> None:
    registry = CollectorRegistry()

    async def body(scope: Any) -> None:
        def write(session: Session) -> None:
            session.execute(items.insert().values(name=f"task-{id(session)}"))

        def read(session: Session) -> None:
            session.execute(sa.select(items.c.name))

        await gather_with_sessions(scope, write, write, commit=True)
        await gather_with_sessions(scope, read, commit=False)

    await request(endpoint(backend, body, registry))
    closed = "db_sessions_closed_total"
    assert value(registry, closed, route="__unmatched__", outcome="commit") == 2
    assert value(registry, closed, route="__unmatched__", outcome="rollback") == 1
    assert value(registry, "db_session_duration_seconds_count", outcome="commit") == 2
    assert value(registry, "db_sessions_open") == 0


async def test_task_writes_are_rolled_back_with_commit_false(backend: Backend) -> None:
    async def body(scope: Any) -> None:
        def write(session: Session) -> None:
            session.execute(items.insert().values(name="read-only"))

        await gather_with_sessions(scope, write, commit=False)

    await request(endpoint(backend, body))
    assert backend.names() == []


async def test_a_failing_task_rolls_back_its_own_writes_and_the_error_is_raised(
    backend: Backend,
) -> None:
    caught: list[BaseException] = []

    async def body(scope: Any) -> int:
        def fail(session: Session) -> None:
            session.execute(items.insert().values(name="doomed"))
            raise LookupError("task failed")

        try:
            await gather_with_sessions(scope, fail)
        except* LookupError as group:
            caught.extend(group.exceptions)
        return 500

    assert (await request(endpoint(backend, body))).status == 500
    assert [str(e) for e in caught] == ["task failed"]
    assert backend.names() == []


async def test_a_failing_task_cancels_its_siblings_and_their_writes_are_rolled_back(
    async_backend: Backend,
) -> None:
    backend = async_backend
    sibling_wrote = anyio.Event()
    cancelled: list[str] = []

    async def fail(session: AsyncSession) -> None:
        await session.execute(sa.select(sa.literal(1)))
        with anyio.fail_after(10):
            await sibling_wrote.wait()
        raise LookupError("task failed")

    async def sibling(session: AsyncSession) -> None:
        await session.execute(items.insert().values(name="b"))
        sibling_wrote.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append("sibling")
            raise

    async def body(scope: Any) -> int:
        with pytest.raises(ExceptionGroup) as raised:
            await gather_with_sessions(scope, fail, sibling)
        assert raised.group_contains(LookupError)
        return 500

    await request(endpoint(backend, body))
    assert cancelled == ["sibling"]
    assert backend.names() == []


async def test_task_session_commits_on_success_and_rolls_back_on_error(backend: Backend) -> None:
    async def body(scope: Any) -> None:
        async with task_session(scope) as session:
            await backend.insert(session, "kept")
        try:
            async with task_session(scope) as session:
                await backend.insert(session, "dropped")
                raise LookupError
        except LookupError:
            pass

    await request(endpoint(backend, body))
    assert backend.names() == ["kept"]


async def test_task_session_commits_even_when_the_request_answers_4xx(backend: Backend) -> None:
    async def body(scope: Any) -> int:
        async with task_session(scope) as session:
            await backend.insert(session, "audit")
        await backend.insert(scope["state"]["db"], "request-write")
        return 409

    await request(endpoint(backend, body))
    assert backend.names() == ["audit"]


async def test_task_session_after_the_response_started_is_not_a_late_write_of_the_request(
    backend: Backend,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.count(scope["state"]["db"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})
        async with task_session(scope) as session:  # e.g. a background task
            await backend.insert(session, "after")

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert [e for e in logs if e["event"] == "db_session.late_write"] == []
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [(e["outcome"], e["reason"]) for e in closed] == [("commit", None)]
    assert backend.names() == ["after"]


async def test_task_session_kind_mismatch_is_a_clear_error(backend: Backend) -> None:
    wrong = Session if backend.is_async else AsyncSession

    async def body(scope: Any) -> None:
        with pytest.raises(SessionNotAvailableError, match=f"kind={wrong.__name__}"):
            async with task_session(scope, kind=wrong):
                pass

    await request(endpoint(backend, body))


async def test_a_plain_function_gets_a_sync_session_with_an_async_database(
    async_backend: Backend,
) -> None:
    backend = async_backend
    kinds: list[type[Any]] = []

    def write(session: Session) -> None:
        kinds.append(type(session))
        session.execute(items.insert().values(name="via-run-sync"))

    async def body(scope: Any) -> None:
        await gather_with_sessions(scope, write)

    await request(endpoint(backend, body))
    assert kinds == [Session]
    assert backend.names() == ["via-run-sync"]


async def test_a_lambda_returning_a_coroutine_is_refused_with_a_fix(backend: Backend) -> None:
    async def insert(session: Any, name: str) -> None:
        await backend.insert(session, name)

    async def body(scope: Any) -> None:
        with pytest.raises(ExceptionGroup) as raised:
            await gather_with_sessions(scope, lambda s: insert(s, "x"))
        assert raised.group_contains(ConfigurationError, match="async def fn")

    await request(endpoint(backend, body))
    assert backend.names() == []


async def test_task_sessions_need_the_middleware(backend: Backend) -> None:
    with pytest.raises(
        SessionNotAvailableError, match="no DBSessionMiddleware handles this request"
    ):
        async with task_session(http_scope("/")):
            pass

    async def body(scope: Any) -> None:
        with pytest.raises(SessionNotAvailableError, match="no DBSessionMiddleware named 'other'"):
            await gather_with_sessions(scope, name="other")

    await request(endpoint(backend, body))
    with pytest.raises(ConfigurationError, match="ASGI scope"):
        task_session(object())


async def test_a_task_session_after_the_request_finished_is_refused_with_a_fix(
    backend: Backend,
) -> None:
    kept: list[Any] = []

    async def body(scope: Any) -> None:
        kept.append(scope)

    await request(endpoint(backend, body))
    with pytest.raises(SessionNotAvailableError, match="the request has finished"):
        async with task_session(kept[0]):
            pass
