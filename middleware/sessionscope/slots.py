"""Admission of sync request sessions to the pool's capacity, waiting on the event loop.

A sync endpoint that checks out a connection blocks a worker thread while the pool is full.
When every worker thread is blocked like that, the requests that hold the connections cannot
get a thread to finish (FastAPI serializes a sync route's response in the threadpool), and
everything waits for ``pool_timeout``: the threadpool/pool deadlock. So a request asking for
its session through the dependency first takes one of ``pool_size + max_overflow`` slots,
awaiting it on the event loop where waiting costs no thread. The slot is given back when the
request transaction is decided (the connection is returned then) or the request ends.
"""

from __future__ import annotations

from typing import Final

import anyio
from anyio.lowlevel import RunVar
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import QueuePool

DEFAULT_TIMEOUT: Final = 30.0


class SessionSlots:
    """At most ``capacity`` request sessions of one engine at a time, per event loop."""

    __slots__ = ("_semaphore", "capacity", "timeout")

    def __init__(self, capacity: int, timeout: float, name: str) -> None:
        self.capacity = capacity
        self.timeout = timeout
        self._semaphore: RunVar[anyio.Semaphore] = RunVar(f"sessionscope_slots_{name}")

    @classmethod
    def for_engine(cls, engine: Engine, name: str) -> SessionSlots | None:
        """Slots sized to a ``QueuePool``'s capacity; ``None`` for unbounded pools."""
        pool = engine.pool
        if not isinstance(pool, QueuePool):
            return None
        overflow = pool._max_overflow  # no public accessor; set by pool_size/max_overflow
        if overflow < 0:
            return None
        return cls(pool.size() + overflow, float(pool.timeout()), name)

    def _semaphore_here(self) -> anyio.Semaphore:
        try:
            return self._semaphore.get()
        except LookupError:
            semaphore = anyio.Semaphore(self.capacity)
            self._semaphore.set(semaphore)
            return semaphore

    def try_acquire(self) -> anyio.Semaphore | None:
        """A slot if one is free right now (no waiting, no loop round-trip), else ``None``."""
        semaphore = self._semaphore_here()
        if semaphore.value > 0:
            semaphore.acquire_nowait()
            return semaphore
        return None

    async def acquire(self) -> anyio.Semaphore:
        """Wait for a slot (up to the pool timeout); the semaphore to release it on."""
        semaphore = self._semaphore_here()
        try:
            with anyio.fail_after(self.timeout):
                await semaphore.acquire()
        except TimeoutError:
            raise PoolTimeoutError(
                f"all {self.capacity} connections of the pool are held by other requests; "
                f"waited {self.timeout:g} s for one (raise pool_size/max_overflow or "
                "find what holds them)"
            ) from None
        return semaphore
