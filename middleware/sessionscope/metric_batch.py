"""Metric updates of the request path, kept as plain numbers and written to Prometheus in bulk.

A prometheus_client update takes a lock of its own, and a histogram looks for its bucket in a
Python loop: about 0.5 µs for a counter and 1 µs for a histogram, and a request makes ten of
them. Here the request path adds to plain numbers under one lock shared by a whole
:class:`MetricBatch` (taken once for all the updates of one event), and the prometheus_client
children are written in bulk:

* whenever the registry is collected (a scrape, ``registry.get_sample_value``): a collector
  registered before the metric families flushes first, so a scrape sees every update made
  before it;
* at most a second after the last flush, by the next request that closes a session, and by
  the leak sweep: a scrape that skips that collector (a ``name[]=`` filtered one) lags by about
  a second.

Under prometheus_client's multiprocess mode the scrape runs in another process, so nothing is
held back there: what :meth:`MetricBatch.counter` and :meth:`MetricBatch.histogram` return
writes through to the children.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from time import perf_counter
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, values

FLUSH_INTERVAL: Final = 1.0
"""Seconds after a flush when the request path flushes again."""
_MULTIPROC_ENV: Final = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return True
    return any(name in os.environ for name in _MULTIPROC_ENV)


class Counting(Protocol):
    """A counter or gauge child as the request path updates it."""

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""


class Observing(Protocol):
    """A histogram child as the request path updates it."""

    def observe(self, amount: float) -> None:
        """Count one observation of ``amount``."""

    def observe_held(self, amount: float) -> None:
        """Count one observation of ``amount``; the caller holds the batch's ``lock``."""


class MetricBatch:
    """Pending updates of prometheus_client children; :meth:`flush` writes them.

    Several updates made together take the lock once: ``with batch.lock:`` and
    ``observe_held``, or an aggregate of its own (:class:`Pending`).
    """

    def __init__(self, *, immediate: bool = False, interval: float = FLUSH_INTERVAL) -> None:
        self.immediate = immediate
        """Write every update to its child at once (multiprocess mode)."""
        self.lock = threading.Lock()
        """Held for each pending update (and to take them for a flush): uncontended, cheap."""
        self.dirty: list[Pending] = []
        """The pending objects updated since the last flush."""
        self.flush_at = perf_counter() + interval
        """When the request path flushes next (``perf_counter()`` time)."""
        self._interval = interval
        self._writing = threading.Lock()

    def counter(self, child: Any) -> Counting:
        """What to update instead of the counter or gauge child ``child``."""
        if self.immediate:
            return child  # type: ignore[no-any-return]
        return PendingCounter(self, child)

    def histogram(self, child: Any) -> Observing:
        """What to update instead of the histogram child ``child``."""
        if self.immediate or not bulk_writable(child):
            return _DirectHistogram(child)
        return PendingHistogram(self, child)

    def flush_due(self, now: float) -> None:
        """Flush if the last flush is more than the interval before ``now``."""
        if now >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Write every pending update to its child; returns once they are all written."""
        # One writer at a time, so a scrape that flushes waits for a flush in progress and then
        # sees its updates too.
        with self._writing:
            with self.lock:
                dirty, self.dirty = self.dirty, []
                taken = [(pending, pending.take()) for pending in dirty]
                self.flush_at = perf_counter() + self._interval
            for pending, update in taken:
                pending.write(update)

    def register_flush(self, registry: CollectorRegistry) -> None:
        """Make every collection of ``registry`` flush first (call before adding families)."""
        registry.register(_FlushOnCollect(self))


class Pending:
    """Updates waiting for a flush. Whoever updates one, holding the batch's lock, sets
    ``is_dirty`` and appends it to ``batch.dirty`` if it was not dirty yet."""

    __slots__ = ("batch", "is_dirty")

    def __init__(self, batch: MetricBatch) -> None:
        self.batch = batch
        self.is_dirty = False

    def take(self) -> Any:
        """The pending update, reset to nothing (called with the batch lock held)."""
        raise NotImplementedError

    def write(self, update: Any) -> None:
        """Write an update taken by :meth:`take` to the children."""
        raise NotImplementedError


class PendingCounter(Pending):
    __slots__ = ("child", "delta")

    def __init__(self, batch: MetricBatch, child: Any) -> None:
        super().__init__(batch)
        self.child = child
        self.delta = 0.0

    def inc(self, amount: float = 1) -> None:
        batch = self.batch
        with batch.lock:
            self.delta += amount
            if not self.is_dirty:
                self.is_dirty = True
                batch.dirty.append(self)

    def take(self) -> float:
        delta, self.delta, self.is_dirty = self.delta, 0.0, False
        return delta

    def write(self, update: float) -> None:
        if update:
            self.child.inc(update)


class Buckets:
    """Pending observations of one histogram child: counts per bucket and their sum.

    An observation of ``value`` adds 1 to ``counts[bisect_left(bounds, value)]`` (the first
    bucket whose upper bound is >= the value, as prometheus_client's own ``observe()``) and
    ``value`` to ``total``; callers do it inline, holding the batch's lock.
    """

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def take(self) -> tuple[list[int], float]:
        """The pending observations, reset to none."""
        taken = self.counts, self.total
        self.counts, self.total = [0] * len(self.bounds), 0.0
        return taken


class PendingHistogram(Pending):
    __slots__ = ("buckets",)

    def __init__(self, batch: MetricBatch, child: Any) -> None:
        super().__init__(batch)
        self.buckets = Buckets(child)

    def observe(self, amount: float) -> None:
        with self.batch.lock:
            self.observe_held(amount)

    def observe_held(self, amount: float) -> None:
        buckets = self.buckets
        buckets.counts[bisect_left(buckets.bounds, amount)] += 1
        buckets.total += amount
        if not self.is_dirty:
            self.is_dirty = True
            self.batch.dirty.append(self)

    def take(self) -> tuple[list[int], float]:
        self.is_dirty = False
        return self.buckets.take()

    def write(self, update: tuple[list[int], float]) -> None:
        write_histogram(self.buckets.child, *update)


class _DirectHistogram:
    """Writes through to the child (multiprocess mode, or a histogram of another shape)."""

    __slots__ = ("child",)

    def __init__(self, child: Any) -> None:
        self.child = child

    def observe(self, amount: float) -> None:
        self.child.observe(amount)

    def observe_held(self, amount: float) -> None:
        self.child.observe(amount)


def write_histogram(child: Any, counts: list[int], total: float) -> None:
    """Add ``counts`` observations per bucket, summing to ``total``, to a histogram child."""
    child._sum.inc(total)
    for bucket, count in zip(child._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def bulk_writable(child: Any) -> bool:
    """Whether ``child`` is a histogram child whose buckets can be written in bulk."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    return (
        isinstance(bounds, list | tuple)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and hasattr(getattr(child, "_sum", None), "inc")
        and all(hasattr(b, "inc") for b in buckets)
        and list(bounds) == sorted(bounds)
    )


class _FlushOnCollect:
    """A collector with no metrics of its own: collecting it flushes the batch."""

    def __init__(self, batch: MetricBatch) -> None:
        self._batch = batch

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._batch.flush()
        return []
