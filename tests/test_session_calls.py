"""Finalizer calls of sync sessions: in AnyIO worker threads under the library's own limiter,
never behind the application's threadpool; their context, results, errors and cancellation."""

from __future__ import annotations

import contextvars
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sessionscope import _session_calls as session_calls
from sessionscope._session_calls import SessionCalls

from .support import items, metadata, wait_until

pytestmark = pytest.mark.anyio

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("finalizer_test", default="unset")


def _calls() -> SessionCalls:
    return SessionCalls(is_async=False, name="calls-test")


async def test_a_finalizer_call_runs_in_a_worker_thread_with_the_callers_context() -> None:
    loop_thread = threading.current_thread()
    _VAR.set("caller's")

    def work() -> tuple[bool, str]:
        return threading.current_thread() is not loop_thread, _VAR.get()

    assert await _calls().finalize(work) == (True, "caller's")


async def test_code_in_a_finalizer_thread_reaches_the_event_loop_with_anyio_from_thread() -> None:
    # A SQLAlchemy commit listener that calls back into the loop runs in a finalizer thread.
    calls = _calls()
    loop_thread = threading.current_thread()

    def back_on_the_loop() -> bool:
        return threading.current_thread() is loop_thread

    assert await calls.finalize(lambda: anyio.from_thread.run_sync(back_on_the_loop)) is True
    assert await calls.finalize(lambda: anyio.from_thread.run(anyio.sleep, 0)) is None
    assert await calls.finalize(anyio.from_thread.check_cancelled) is None


async def test_an_exception_in_a_finalizer_call_is_raised_to_the_caller() -> None:
    calls = _calls()

    def fail() -> None:
        raise ValueError("commit failed")

    with pytest.raises(ValueError, match="commit failed"):
        await calls.finalize(fail)
    assert await calls.finalize(lambda: 42) == 42


async def test_finalizers_run_while_every_threadpool_thread_is_taken(tmp_path: Any) -> None:
    # The threadpool/pool deadlock: request threads blocked on a checkout hold every
    # threadpool token; a session that holds a connection must still commit and give it back.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'calls.db'}")
    metadata.create_all(engine)
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 1
    release = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, release.wait)
            try:
                await wait_until(lambda: limiter.borrowed_tokens == 1)
                session = Session(engine)
                session.execute(items.insert().values(name="committed"))
                with anyio.fail_after(5):
                    await _calls().call(session, "commit", holds_connection=True)
                session.close()
            finally:
                release.set()
    finally:
        limiter.total_tokens = tokens
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(items.c.name)).scalars()) == ["committed"]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    engine.dispose()


async def test_no_more_than_finalizer_threads_run_at_once_and_the_rest_wait_their_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_calls, "FINALIZER_THREADS", 3)
    calls = _calls()
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def hold(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return i

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await calls.finalize(lambda: hold(i))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(call, i)
        await wait_until(lambda: running == 3)
        await anyio.sleep(0.05)
        assert running == 3
        release.set()
    assert results == {i: i for i in range(8)}
    assert most == 3


async def test_a_finalizer_call_cancelled_before_it_starts_never_runs() -> None:
    ran = threading.Event()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await _calls().finalize(ran.set)
    assert scope.cancelled_caught
    assert not ran.is_set()


async def test_a_started_finalizer_call_is_waited_for_even_when_its_caller_is_cancelled() -> None:
    started = threading.Event()
    done: list[str] = []

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        done.append("finished")

    with anyio.move_on_after(0.05) as scope:
        await _calls().finalize(slow)
    assert started.is_set()
    assert done == ["finished"], "the caller went on while its call was still running"
    assert scope.cancel_called
