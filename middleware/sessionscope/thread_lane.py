"""Worker threads of their own, for calls that must not queue behind the threadpool.

:class:`ThreadLane` runs a function in one of at most ``max_threads`` threads and lets the
event loop await it: what ``anyio.to_thread.run_sync`` with a ``CapacityLimiter`` does, at
about half the cost of a hop. A job is one ``SimpleQueue.put`` there and one
``call_soon_threadsafe`` back; there are no limiter tokens to take and give back, which cost
anyio's version an extra pass of the event loop. Threads start when a job finds none idle and
end after ``idle_seconds`` without work.

Code running in a lane thread (a SQLAlchemy ``commit`` listener, say) may call
``anyio.from_thread.run()``/``run_sync()`` as in an AnyIO worker thread: the lane marks its
threads the way AnyIO marks its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

import anyio
import anyio.lowlevel
import anyio.to_thread

_anyio_thread: threading.local | None
try:
    # How AnyIO tells its worker threads which loop they belong to (private, hence guarded:
    # without it a lane thread is an ordinary thread, and from_thread needs a token there).
    from anyio._core._eventloop import threadlocals as _anyio_thread
except ImportError:  # pragma: no cover - an AnyIO that moved it
    _anyio_thread = None

IDLE_SECONDS: Final = 10.0
"""How long a lane thread waits for a job before it ends (AnyIO's workers wait as long)."""

_Job = tuple[
    contextvars.Context,
    Callable[[], Any],
    asyncio.AbstractEventLoop,
    "asyncio.Future[Any]",
    Any,
]
"""(context to run in, the call, its loop, the future to settle there, the loop's AnyIO token)"""


class ThreadLane:
    """At most ``max_threads`` threads running the calls given to :meth:`run`, first come first
    served (calls beyond that wait for a thread to come free)."""

    __slots__ = (
        "_idle",
        "_idle_seconds",
        "_jobs",
        "_lock",
        "_max",
        "_name",
        "_threads",
        "_token",
        "_token_loop",
        "_unclaimed",
    )

    def __init__(self, max_threads: int, name: str, *, idle_seconds: float = IDLE_SECONDS) -> None:
        self._max = max_threads
        self._name = name
        self._idle_seconds = idle_seconds
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        """Threads waiting for a job that no job has been queued for yet."""
        self._unclaimed = 0
        """Jobs queued while every thread was busy and the lane was full."""
        # The AnyIO token of the loop seen last (looking it up costs about 1 µs).
        self._token_loop: asyncio.AbstractEventLoop | None = None
        self._token: Any = None

    @property
    def threads(self) -> int:
        """How many threads the lane has now."""
        return self._threads

    async def run(self, func: Callable[[], Any]) -> Any:
        """``func()`` in a lane thread, in a copy of the caller's context.

        A cancellation before the call starts stops it (it never runs); once it has been handed
        to a thread it is waited for, as ``anyio.to_thread.run_sync`` waits.
        """
        loop = asyncio._get_running_loop()
        if loop is None:  # not asyncio (trio): AnyIO's own threads
            return await anyio.to_thread.run_sync(func)
        await anyio.lowlevel.checkpoint_if_cancelled()
        if loop is not self._token_loop:
            self._token, self._token_loop = anyio.lowlevel.current_token(), loop
        future: asyncio.Future[Any] = loop.create_future()
        self._submit((contextvars.copy_context(), func, loop, future, self._token))
        with anyio.CancelScope(shield=True):
            return await future

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                start = False
            elif self._threads < self._max:
                self._threads += 1
                start = True
            else:
                self._unclaimed += 1
                start = False
        if start:
            # Started before the job is queued: a thread that fails to start leaves no job behind.
            thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            try:
                thread.start()
            except BaseException:
                with self._lock:
                    self._threads -= 1
                raise
        self._jobs.put(job)

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            try:
                context, func, loop, future, token = jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with lock:
                    if self._idle:  # no job is on its way to an idle thread: this one ends
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # a job was claimed for an idle thread: it is about to arrive
            _run(context, func, loop, future, token)
            with lock:
                if self._unclaimed:
                    self._unclaimed -= 1  # take a job that waited for a thread
                else:
                    self._idle += 1


def _run(
    context: contextvars.Context,
    func: Callable[[], Any],
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    token: Any,
) -> None:
    marks = _anyio_thread
    if marks is not None:
        marks.current_token = token
        marks.current_cancel_scope = None  # the call is shielded: nothing can cancel it
    try:
        result = context.run(func)
    except BaseException as exc:  # handed to the awaiting task, which raises it
        _post(loop, future, None, exc)
    else:
        _post(loop, future, result, None)
    finally:
        if marks is not None:
            del marks.current_token, marks.current_cancel_scope


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    exc: BaseException | None,
) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for the result
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():  # a task cancelled from outside AnyIO stopped waiting
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
