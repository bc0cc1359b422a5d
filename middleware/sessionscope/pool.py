"""Connection-pool metrics of one engine: pool state, waits, timeouts and connection churn.

``instrument_pool(engine, metrics, db)`` exports, under the label ``db``:

* **state gauges** ``pool_connections{state}``, ``pool_connections_max`` and
  ``pool_timeout_seconds``, read from the pool itself (``checkedout()``, ``checkedin()``,
  ``size()``, ``timeout()``), never kept by counting events up and down. In a single process
  they are read at scrape time. Under ``PROMETHEUS_MULTIPROC_DIR`` scrape-time functions do not
  work, so checkout and checkin events write them and :meth:`PoolInstruments.refresh`, called by a
  periodic sweep, resynchronises them. Pools without that state (``NullPool``, ``StaticPool``,
  ``SingletonThreadPool``, ``AssertionPool``) export none of these gauges.
* **checkout** ``pool_pending_requests``, ``pool_wait_seconds`` (successful and timed-out
  checkouts) and ``pool_timeouts_total``, measured by wrapping the pool's public ``connect()``,
  through which every Core and ORM checkout goes. A timeout also logs a ``db_pool.timeout``
  error event with the pool's state; the exception is re-raised unchanged.
* **connection churn** ``pool_use_seconds`` (from the ``connect()`` wrapper to the ``checkin``
  event), ``pool_connect_seconds``, ``pool_connections_created_total``,
  ``pool_connections_closed_total`` and ``pool_connections_invalidated_total{kind}``, from pool
  and dialect events.

The two histograms updated on every checkout and checkin are batched (:mod:`.metric_batch`).

Everything survives ``engine.dispose()``: event listeners move to the new pool with the pool's
dispatch, and the ``connect()`` wrapper is re-applied by wrapping ``recreate()``, which
``dispose()`` calls to make the new pool. No connection-level (``ConnectionEvents``) listener is
installed: one of those makes SQLAlchemy build an event dispatcher for every ``Connection``,
which costs more per request than everything measured here.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool, PoolProxiedConnection

from . import catalogue as cat
from .metric_batch import multiprocess_mode
from .metrics import Metrics
from .reporting import event_log
from .source import is_async_engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

TIMEOUT_EVENT: Final = "db_pool.timeout"
INVALIDATION_KINDS: Final = ("hard", "soft")
_INSTRUMENTS_ATTRIBUTE: Final = "_sessionscope_pool_instruments"
_WRAPPED_ATTRIBUTE: Final = "_sessionscope_wrapped_by"

PoolReader = Callable[[Pool], float]


def instrument_pool(
    engine: Engine | AsyncEngine,
    metrics: Metrics,
    db: str,
    *,
    multiprocess: bool | None = None,
) -> PoolInstruments:
    """Export the pool metrics of ``engine`` under the label ``db``; idempotent.

    A second call with the same engine, metrics and ``db`` returns the same instruments and adds
    no listener. An ``AsyncEngine`` is instrumented through its ``sync_engine``.
    ``multiprocess`` overrides the detection of prometheus_client's multiprocess mode.
    """
    sync_engine = engine.sync_engine if is_async_engine(engine) else engine
    # Kept on the engine: the instruments live exactly as long as the engine and its listeners.
    # dict.setdefault is atomic, so two racing calls still install only once.
    installed: dict[tuple[Metrics, str], PoolInstruments] = sync_engine.__dict__.setdefault(
        _INSTRUMENTS_ATTRIBUTE, {}
    )
    found = installed.get((metrics, db))
    if found is not None:
        return found
    mp = multiprocess_mode() if multiprocess is None else multiprocess
    candidate = PoolInstruments(sync_engine, metrics, db, multiprocess=mp)
    found = installed.setdefault((metrics, db), candidate)
    if found is candidate:
        candidate._install()
    return found


class PoolInstruments:
    """The pool metrics of one engine under one ``db`` label; made by :func:`instrument_pool`."""

    def __init__(self, engine: Engine, metrics: Metrics, db: str, *, multiprocess: bool) -> None:
        self.db = db
        self.metrics = metrics
        self.multiprocess = multiprocess
        """Whether gauges are written (events, :meth:`refresh`) rather than read at scrape."""
        self._engine_ref = weakref.ref(engine)
        self._pending = metrics[cat.POOL_PENDING].labels(db)
        self._wait = metrics.batch.histogram(metrics[cat.POOL_WAIT].labels(db))
        self._timeouts = metrics[cat.POOL_TIMEOUTS].labels(db)
        self._use = metrics.batch.histogram(metrics[cat.POOL_USE].labels(db))
        self._connect = metrics[cat.POOL_CONNECT].labels(db)
        self._created = metrics[cat.POOL_CREATED].labels(db)
        self._closed = metrics[cat.POOL_CLOSED].labels(db)
        invalidated = metrics[cat.POOL_INVALIDATED]
        self._hard = invalidated.labels(db, "hard")
        self._soft = invalidated.labels(db, "soft")
        # Per-instance keys in ConnectionRecord.info: two instruments (two ``db`` labels) on one
        # engine must not consume each other's timestamps.
        self._checkout_key = object()
        self._connect_key = object()
        self._gauges: list[tuple[Any, PoolReader]] = []
        self._used: Any = None
        self._idle: Any = None

    @property
    def engine(self) -> Engine | None:
        """The instrumented engine (held weakly: a registry does not keep engines alive)."""
        return self._engine_ref()

    def refresh(self, pool: Pool | None = None) -> None:
        """Set the state gauges from ``pool`` (default: the engine's current pool); what a
        multiprocess sweep calls.

        In a single process the same gauges are read at scrape time, so this is not needed there
        (and harmless). Never raises; a value that cannot be read is set to NaN.
        """
        if pool is None:
            engine = self._engine_ref()
            if engine is None:
                return
            pool = engine.pool
        for child, read in self._gauges:
            child.set(_read(read, pool))

    # ------------------------------------------------------------------------ installation

    def _install(self) -> None:
        engine = self._engine_ref()
        assert engine is not None
        # Only gauges the pool can answer get a child: a created child would export a false 0.
        self._gauges = [
            (self.metrics[metric].labels(self.db, *labels), read)
            for metric, labels, read in _supported_gauges(engine.pool)
        ]
        if self.multiprocess:
            self.refresh()
        else:
            ref = self._engine_ref
            for child, read in self._gauges:
                child.set_function(_scrape_reader(ref, read))

        event.listen(engine, "do_connect", self._on_do_connect)
        event.listen(engine, "connect", self._on_connect)
        event.listen(engine, "checkin", self._on_checkin)
        event.listen(engine, "close", self._on_close)
        event.listen(engine, "close_detached", self._on_close_detached)
        event.listen(engine, "invalidate", self._on_invalidate)
        event.listen(engine, "soft_invalidate", self._on_soft_invalidate)
        if self.multiprocess and _has(engine.pool, "checkedout") and _has(engine.pool, "checkedin"):
            self._used = self.metrics[cat.POOL_CONNECTIONS].labels(self.db, "used")
            self._idle = self.metrics[cat.POOL_CONNECTIONS].labels(self.db, "idle")
            event.listen(engine, "checkout", self._set_on_checkout)
            event.listen(engine, "checkin", self._set_on_checkin)
        self._wrap(engine.pool)

    def _wrap(self, pool: Pool) -> None:
        """Replace ``pool.connect`` and ``pool.recreate`` (on the instance) with wrappers that
        measure checkouts and instrument the pool that replaces this one; once per pool."""
        wrapped_by: set[PoolInstruments] = pool.__dict__.setdefault(_WRAPPED_ATTRIBUTE, set())
        if self in wrapped_by:
            return
        wrapped_by.add(self)
        recreate: Callable[[], Pool] = pool.recreate

        def recreate_instrumented() -> Pool:
            # engine.dispose() makes the new pool here; listeners move with its dispatch.
            new_pool = recreate()
            self._wrap(new_pool)
            if self.multiprocess:
                self.refresh(new_pool)
            return new_pool

        setattr(pool, "recreate", recreate_instrumented)  # noqa: B010 (as for connect below)
        # Chains onto whatever is there, so several instruments (db labels) can wrap one pool.
        original: Callable[[], PoolProxiedConnection] = pool.connect
        pending = self._pending
        wait = self._wait
        lock = self.metrics.batch.lock
        checkout_key = self._checkout_key

        idle_queue = _idle_queue(pool)
        idle = getattr(pool, "checkedin", None)
        # An async pool makes its queue at its first checkout, on the event loop: look again
        # then. Pools without a queue (NullPool, StaticPool, SingletonThreadPool) never ask.
        queue_later = idle_queue is None and getattr(pool, "_pool", None) is not None

        def connect() -> PoolProxiedConnection:
            nonlocal idle_queue, queue_later
            if queue_later:
                idle_queue = _idle_queue(pool)
                queue_later = idle_queue is None
            # With an idle connection in the pool the checkout does not wait: it is not
            # counted as pending (two locked gauge updates saved on the common path).
            may_wait = not idle_queue if idle_queue is not None else idle is None or idle() <= 0
            if may_wait:
                pending.inc()
            start = perf_counter()
            try:
                connection = original()
            except PoolTimeoutError:
                waited = perf_counter() - start
                wait.observe(waited)
                self._timeouts.inc()
                self._log_timeout(pool, waited)
                raise
            finally:
                if may_wait:
                    pending.dec()
            checked_out = perf_counter()
            with lock:
                wait.observe_held(checked_out - start)
            # Where a checkout listener would note it, without paying for an event dispatch:
            # in the record's info, as the checkin event sees it. The fairy's own ``info`` is
            # a property computed again for every checkout; the record's, once per connection.
            record = getattr(connection, "_connection_record", None)
            (connection if record is None else record).info[checkout_key] = checked_out
            return connection

        setattr(pool, "connect", connect)  # noqa: B010 (mypy forbids assigning to a method)

    def observe_wait(self, waited: float) -> None:
        """Record a wait for a connection that happened before the pool was asked (admission)."""
        self._wait.observe(waited)

    def record_timeout(self, waited: float) -> None:
        """Count, observe and log a wait for a connection that gave up (admission timeout)."""
        self._wait.observe(waited)
        self._timeouts.inc()
        engine = self.engine
        if engine is not None:
            self._log_timeout(engine.pool, waited)

    def _log_timeout(self, pool: Pool, waited: float) -> None:
        """The ``db_pool.timeout`` error event; ``pending`` counts the other waiting checkouts."""
        overflow = _call(pool, "overflow")
        event_log().error(
            TIMEOUT_EVENT,
            db=self.db,
            pool_size=_call(pool, "size"),
            checked_out=_call(pool, "checkedout"),
            # overflow() is negative until the pool has opened pool_size connections.
            overflow=None if overflow is None else max(int(overflow), 0),
            # Still counts this checkout: the wrapper decrements after logging.
            pending=_own_value(self._pending) - 1,
            waited_s=round(waited, 6),
            timeout_s=_call(pool, "timeout"),
        )

    # ---------------------------------------------------------------------------- events

    def _on_do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        record.info[self._connect_key] = perf_counter()

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self._created.inc()
        started = record.info.pop(self._connect_key, None)
        if started is not None:
            self._connect.observe(perf_counter() - started)

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(self._checkout_key, None)
        if started is not None:
            seconds = perf_counter() - started
            with self.metrics.batch.lock:
                self._use.observe_held(seconds)

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        self._closed.inc()

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        self._closed.inc()

    def _on_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        self._hard.inc()

    def _on_soft_invalidate(self, dbapi_connection: Any, record: Any, exception: Any) -> None:
        self._soft.inc()

    def _set_on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        engine = self._engine_ref()
        if engine is not None:
            pool: Any = engine.pool
            self._used.set(pool.checkedout())
            self._idle.set(pool.checkedin())

    def _set_on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        # At checkin the pool still counts the connection as checked out; it goes back to the
        # idle queue unless the queue is full (an overflow connection is closed instead).
        engine = self._engine_ref()
        if engine is not None:
            pool: Any = engine.pool
            idle = pool.checkedin()
            self._used.set(max(pool.checkedout() - 1, 0))
            self._idle.set(idle + 1 if idle < pool.size() else idle)


def _idle_queue(pool: Pool) -> deque[Any] | None:
    """The deque of ``pool``'s idle connections, else ``None``: a sync ``QueuePool``'s, or
    an ``AsyncAdaptedQueuePool``'s once its ``asyncio.Queue`` exists (made at the first
    checkout, on the event loop; never replaced).

    Its length is read without a lock (``len`` of a deque is atomic): the public
    ``checkedin()`` costs three Python calls per checkout (and the sync queue's lock).
    """
    queue = getattr(pool, "_pool", None)
    idle_queue = getattr(queue, "queue", None)  # sqlalchemy.util.queue.Queue
    if idle_queue is None and queue is not None:
        # AsyncAdaptedQueue memoizes its asyncio.Queue in __dict__: do not create it here.
        idle_queue = getattr(getattr(queue, "__dict__", {}).get("_queue"), "_queue", None)
    return idle_queue if isinstance(idle_queue, deque) else None


def _supported_gauges(pool: Pool) -> list[tuple[cat.Metric, tuple[str, ...], PoolReader]]:
    """The state gauges ``pool`` can answer: metric, labels besides ``db``, how to read it."""
    gauges: list[tuple[cat.Metric, tuple[str, ...], PoolReader]] = []
    if _has(pool, "checkedout") and _has(pool, "checkedin"):
        gauges.append((cat.POOL_CONNECTIONS, ("used",), _checked_out))
        gauges.append((cat.POOL_CONNECTIONS, ("idle",), _checked_in))
    if _has(pool, "size") and isinstance(getattr(pool, "_max_overflow", None), int):
        gauges.append((cat.POOL_CONNECTIONS_MAX, (), _max_connections))
    if _has(pool, "timeout"):
        gauges.append((cat.POOL_TIMEOUT, (), _timeout))
    return gauges


def _checked_out(pool: Any) -> float:
    return float(pool.checkedout())


def _checked_in(pool: Any) -> float:
    return float(pool.checkedin())


def _max_connections(pool: Any) -> float:
    # SQLAlchemy has no public accessor for max_overflow; -1 (or pool_size 0) means no limit.
    size = int(pool.size())
    overflow = int(pool._max_overflow)
    if size == 0 or overflow < 0:
        return math.inf
    return float(size + overflow)


def _timeout(pool: Any) -> float:
    return float(pool.timeout())


def _has(pool: Pool, method: str) -> bool:
    return callable(getattr(pool, method, None))


def _read(read: PoolReader, pool: Pool) -> float:
    try:
        return read(pool)
    except Exception:  # a scrape or a sweep must never fail on an odd pool
        return math.nan


def _scrape_reader(engine_ref: weakref.ref[Engine], read: PoolReader) -> Callable[[], float]:
    """A ``set_function`` body; reads ``engine.pool`` each time, as ``dispose()`` replaces it."""

    def value() -> float:
        engine = engine_ref()
        if engine is None:
            return math.nan
        return _read(read, engine.pool)

    return value


def _own_value(child: Any) -> int:
    """This process's value of a gauge child (public ``collect()``; rare path, not per event)."""
    try:
        return int(child.collect()[0].samples[0].value)
    except Exception:  # only feeds a log field
        return 0


def _call(pool: Pool, method: str) -> Any:
    try:
        return getattr(pool, method)()
    except Exception:  # the timeout is being reported; its pool state is best effort
        return None
