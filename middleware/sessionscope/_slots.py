"""Admission of sync request sessions to the pool's capacity, waiting on the event loop.

A sync endpoint that checks out a connection blocks a worker thread while the pool is full.
When every worker thread is blocked like that, the requests that hold the connections cannot
get a thread to finish (FastAPI validates a sync route's response in the threadpool), and
everything waits for ``pool_timeout``: the threadpool/pool deadlock. So a request session of a
sync engine first takes one of ``pool_size + max_overflow`` slots, and never waits for one
while holding a thread of the threadpool:

* asked for on the event loop (the ``DBSession`` dependency), it waits there, where waiting
  costs no thread;
* first asked for in a worker thread (``request.state.db`` in a ``def`` route), it takes a free
  slot at once, or else hands its thread's place in the threadpool back for as long as it
  waits, so that the requests holding connections can still get a thread to finish.

The slot is given back when the request transaction is decided (the connection is returned
then) or the request ends. A transaction the session begins after the decision (a streaming
body using it) takes a slot again, until it ends or the request does: every connection a
request session holds is counted, so the requests admitted never wait in a thread for a
connection that only a stream could give back. Waiters are served first come, first served.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections import deque

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import QueuePool

from . import _compat


class LoopSlots:
    """The slots of one engine on one event loop.

    ``try_acquire`` may be called from any thread; waiting and releasing happen on the loop.
    """

    __slots__ = ("_capacity", "_in_use", "_lock", "_timeout", "_waiters")

    def __init__(self, capacity: int, timeout: float) -> None:
        self._capacity = capacity
        self._timeout = timeout
        self._lock = threading.Lock()
        self._in_use = 0
        self._waiters: deque[anyio.Event] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free right now (no waiting); from any thread."""
        with self._lock:
            if self._in_use < self._capacity:
                self._in_use += 1
                return True
            return False

    async def acquire(self) -> None:
        """Wait on the loop for a slot, up to the pool timeout (then ``PoolTimeoutError``)."""
        if self.try_acquire():
            return
        waiter = anyio.Event()
        with self._lock:
            self._waiters.append(waiter)
        try:
            with anyio.move_on_after(self._timeout):
                await waiter.wait()
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.is_set():
            return  # a releasing request handed its slot over
        self._abandon(waiter)
        raise PoolTimeoutError(
            f"all {self._capacity} connections of the pool are held by other requests; "
            f"waited {self._timeout:g} s for one (raise pool_size/max_overflow or "
            "find what holds them)"
        )

    async def acquire_lending_thread(self) -> None:
        """:meth:`acquire` for a worker thread blocked on it: the threadpool gets one more
        thread for as long as this one waits, so the thread it holds is not missed."""
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens += 1
        try:
            await self.acquire()
        finally:
            limiter.total_tokens -= 1

    def release(self) -> None:
        """Give a slot back: to the longest waiter if there is one. On the event loop."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.is_set():
                    waiter.set()  # the slot changes hands; in_use stays as it is
                    return
            self._in_use -= 1

    def _abandon(self, waiter: anyio.Event) -> None:
        """A waiter leaves (timeout, cancellation); a slot handed to it goes back."""
        with self._lock:
            try:
                self._waiters.remove(waiter)
            except ValueError:  # already handed a slot
                pass
            else:
                return
        self.release()


class SessionSlots:
    """At most ``capacity`` request sessions of one engine at a time, per event loop."""

    __slots__ = ("_here", "_last_loop", "_last_slots", "capacity", "timeout")

    def __init__(self, capacity: int, timeout: float, name: str) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self._here: RunVar[LoopSlots] = RunVar(f"sessionscope_slots_{name}")
        # The asyncio loop seen last and its slots: every request asks, and a RunVar lookup
        # costs more than the rest of a request that never uses its session. The loop is held
        # until another one asks (a closed loop of a finished test run, at most one).
        self._last_loop: asyncio.AbstractEventLoop | None = None
        self._last_slots: LoopSlots | None = None

    @classmethod
    def for_engine(cls, engine: Engine, name: str) -> SessionSlots | None:
        """Slots sized to a ``QueuePool``'s capacity; ``None`` for unbounded pools.

        Also ``None`` when the pool's ``max_overflow`` cannot be read (SQLAlchemy has no public
        getter, see :func:`sessionscope._compat.max_overflow`): the pool is then treated as
        unbounded, its sessions are not admitted to slots, and a full pool makes requests
        wait in the pool checkout (the threadpool/pool deadlock is no longer prevented).
        """
        pool = engine.pool
        if not isinstance(pool, QueuePool):
            return None
        overflow = _compat.max_overflow(pool)
        if overflow is None:
            warnings.warn(
                f"sessionscope cannot read max_overflow of the pool of database {name!r} "
                f"({type(pool).__name__}); its sync request sessions are not admitted to pool "
                "slots, so requests waiting for a connection hold threadpool threads",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if overflow < 0:
            return None
        return cls(pool.size() + overflow, float(pool.timeout()), name)

    def here(self) -> LoopSlots:
        """The slots of the running event loop (call on the loop)."""
        loop = asyncio._get_running_loop()  # None under another event loop library (trio)
        if loop is not None and loop is self._last_loop and self._last_slots is not None:
            return self._last_slots
        try:
            slots = self._here.get()
        except LookupError:
            slots = LoopSlots(self.capacity, self.timeout)
            self._here.set(slots)
        if loop is not None:
            self._last_loop, self._last_slots = loop, slots
        return slots
