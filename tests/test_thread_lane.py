"""The finalizer threads: what they run, where, how many at once, and when they stop."""

from __future__ import annotations

import contextvars
import threading
import time

import anyio
import anyio.from_thread
import pytest

from sessionscope.thread_lane import ThreadLane

from .support import wait_until

pytestmark = pytest.mark.anyio

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("lane_test", default="unset")


async def test_a_call_runs_in_a_lane_thread_with_the_callers_context_and_returns_its_value() -> (
    None
):
    lane = ThreadLane(2, "lane-test")
    _VAR.set("caller's")

    def work() -> tuple[str, str]:
        return threading.current_thread().name, _VAR.get()

    assert await lane.run(work) == ("lane-test", "caller's")
    assert lane.threads == 1


async def test_code_in_a_lane_thread_reaches_the_event_loop_as_from_an_anyio_worker_thread() -> (
    None
):
    # A SQLAlchemy commit listener that calls back into the loop runs in a lane thread.
    lane = ThreadLane(1, "lane-test")
    loop_thread = threading.current_thread()

    def back_on_the_loop() -> bool:
        return threading.current_thread() is loop_thread

    assert await lane.run(lambda: anyio.from_thread.run_sync(back_on_the_loop)) is True
    assert await lane.run(lambda: anyio.from_thread.run(anyio.sleep, 0)) is None
    assert await lane.run(anyio.from_thread.check_cancelled) is None


async def test_an_exception_in_the_call_is_raised_to_the_caller_and_the_thread_goes_on() -> None:
    lane = ThreadLane(1, "lane-test")

    def fail() -> None:
        raise ValueError("commit failed")

    with pytest.raises(ValueError, match="commit failed"):
        await lane.run(fail)
    assert await lane.run(lambda: 42) == 42
    assert lane.threads == 1


async def test_no_more_than_max_threads_run_at_once_and_the_rest_wait_their_turn() -> None:
    lane = ThreadLane(3, "lane-test")
    release = threading.Event()
    running = 0
    most = 0
    finished: list[int] = []
    lock = threading.Lock()

    def hold(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
            finished.append(i)
        return i

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await lane.run(lambda: hold(i))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(call, i)
        await wait_until(lambda: running == 3)
        await anyio.sleep(0.05)
        assert (running, lane.threads) == (3, 3)
        release.set()
    assert results == {i: i for i in range(8)}
    assert most == 3
    assert sorted(finished) == list(range(8))


async def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    lane = ThreadLane(1, "lane-test")
    ran = threading.Event()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await lane.run(ran.set)
    assert scope.cancelled_caught
    assert not ran.is_set()


async def test_a_started_call_is_waited_for_even_when_its_caller_is_cancelled() -> None:
    lane = ThreadLane(1, "lane-test")
    started = threading.Event()
    done: list[str] = []

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        done.append("finished")

    with anyio.move_on_after(0.05) as scope:
        await lane.run(slow)
    assert started.is_set()
    assert done == ["finished"], "the caller went on while its call was still running"
    assert scope.cancel_called


async def test_idle_threads_end_and_a_later_call_starts_a_new_one() -> None:
    lane = ThreadLane(2, "lane-idle-test", idle_seconds=0.05)
    await lane.run(lambda: None)
    assert lane.threads == 1
    await wait_until(lambda: lane.threads == 0)
    await wait_until(lambda: all(t.name != "lane-idle-test" for t in threading.enumerate()))
    assert await lane.run(lambda: "again") == "again"
    assert lane.threads == 1


async def test_calls_arriving_while_threads_go_idle_are_never_stranded() -> None:
    # Idle threads time out all the time here; every call must still be answered.
    lane = ThreadLane(2, "lane-test", idle_seconds=0.001)
    for i in range(300):
        assert await lane.run(lambda i=i: i) == i
        if i % 10 == 0:
            await anyio.sleep(0.002)
