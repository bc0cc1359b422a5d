"""Connection-pool metrics of one engine: pool state, waits, timeouts and connection churn.

``instrument_pool(engine, metrics, db)`` exports, under the label ``db``:

* **state gauges** ``pool_connections{state}``, ``pool_connections_max`` and
  ``pool_timeout_seconds``, read from the pool itself (``checkedout()``, ``checkedin()``,
  ``size()``, ``timeout()``), never kept by counting events up and down. In a single process
  they are read at scrape time. Under ``PROMETHEUS_MULTIPROC_DIR`` scrape-time functions do not
  work, so checkout and checkin events write them and :meth:`PoolInstruments.refresh`, called by a
  periodic sweep, resynchronises them. Pools without that state (``NullPool``, ``StaticPool``,
  ``SingletonThreadPool``, ``AssertionPool``) export none of these gauges, and a pool whose
  ``max_overflow`` cannot be read (:mod:`._compat`) exports no ``pool_connections_max``.
* **waiting for a connection** ``pool_pending_requests``, ``pool_wait_seconds`` and
  ``pool_timeouts_total``: SQLAlchemy has no public hook at the start of a checkout, so these
  count what sessionscope itself waits for before it lets a request check out (the admission of
  :mod:`.slots`, through :meth:`PoolInstruments.observe_wait` and
  :meth:`PoolInstruments.record_timeout`, which also logs a ``db_pool.timeout`` error event with
  the pool's state). Request sessions without admission (async engines) count their wait inside
  the pool from their first transaction to its first connection, through session events
  (:mod:`._lifecycle`), reported by the same methods. Other checkouts are not measured.
* **connection churn** ``pool_use_seconds`` (from the ``checkout`` event to the ``checkin``
  event), ``pool_connect_seconds``, ``pool_connections_created_total``,
  ``pool_connections_closed_total`` and ``pool_connections_invalidated_total{kind}``, from pool
  and dialect events.

Everything survives ``engine.dispose()``: the listeners are installed through the engine, which
SQLAlchemy applies to its pool, and ``dispose()`` makes the new pool with the old one's
dispatch. No connection-level (``ConnectionEvents``) listener is installed: one of those makes
SQLAlchemy build an event dispatcher for every ``Connection``, which costs more per request than
everything measured here. Only public APIs of SQLAlchemy and prometheus_client are used.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from . import _compat
from . import catalogue as cat
from ._metrics import Metrics, multiprocess_mode
from ._reporting import event_log
from ._source import is_async_engine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

TIMEOUT_EVENT: Final = "db_pool.timeout"
INVALIDATION_KINDS: Final = ("hard", "soft")
_INSTRUMENTS_ATTRIBUTE: Final = "_sessionscope_pool_instruments"

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
        self._wait = metrics[cat.POOL_WAIT].labels(db)
        self._timeouts = metrics[cat.POOL_TIMEOUTS].labels(db)
        self._use = metrics[cat.POOL_USE].labels(db)
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
        event.listen(engine, "checkout", self._on_checkout)
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

    def observe_wait(self, waited: float) -> None:
        """Record a request's wait for a connection (admission, or the pool's checkout)."""
        self._wait.observe(waited)

    def record_timeout(self, waited: float) -> None:
        """Count, observe and log a wait for a connection that gave up (admission timeout)."""
        self._wait.observe(waited)
        self._timeouts.inc()
        engine = self.engine
        if engine is not None:
            self._log_timeout(engine.pool, waited)

    def record_pool_timeout(self) -> None:
        """Count, observe and log a checkout the pool itself gave up on (a request's, seen by
        the middleware), as having waited the pool's timeout."""
        engine = self.engine
        if engine is None:
            self._timeouts.inc()
            return
        timeout = _call(engine.pool, "timeout")
        waited = float(timeout) if isinstance(timeout, int | float) else None
        if waited is not None:
            self._wait.observe(waited)
        self._timeouts.inc()
        self._log_timeout(engine.pool, waited, pending_self=False)

    def _log_timeout(self, pool: Pool, waited: float | None, *, pending_self: bool = True) -> None:
        """The ``db_pool.timeout`` error event; ``pending`` counts the other waiting checkouts
        (``pending_self``: the pending gauge still counts this one)."""
        overflow = _call(pool, "overflow")
        event_log().error(
            TIMEOUT_EVENT,
            db=self.db,
            pool_size=_call(pool, "size"),
            checked_out=_call(pool, "checkedout"),
            # overflow() is negative until the pool has opened pool_size connections.
            overflow=None if overflow is None else max(int(overflow), 0),
            # The admission stops counting its checkout after the log.
            pending=_own_value(self._pending) - (1 if pending_self else 0),
            waited_s=None if waited is None else round(waited, 6),
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

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        # In the record's info, as the checkin event sees it (the proxy's is per checkout).
        record.info[self._checkout_key] = perf_counter()

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        started = record.info.pop(self._checkout_key, None)
        if started is not None:
            self._use.observe(perf_counter() - started)

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


def _supported_gauges(pool: Pool) -> list[tuple[cat.Metric, tuple[str, ...], PoolReader]]:
    """The state gauges ``pool`` can answer: metric, labels besides ``db``, how to read it."""
    gauges: list[tuple[cat.Metric, tuple[str, ...], PoolReader]] = []
    if _has(pool, "checkedout") and _has(pool, "checkedin"):
        gauges.append((cat.POOL_CONNECTIONS, ("used",), _checked_out))
        gauges.append((cat.POOL_CONNECTIONS, ("idle",), _checked_in))
    if _has(pool, "size") and _compat.max_overflow(pool) is not None:
        gauges.append((cat.POOL_CONNECTIONS_MAX, (), _max_connections))
    if _has(pool, "timeout"):
        gauges.append((cat.POOL_TIMEOUT, (), _timeout))
    return gauges


def _checked_out(pool: Any) -> float:
    return float(pool.checkedout())


def _checked_in(pool: Any) -> float:
    return float(pool.checkedin())


def _max_connections(pool: Any) -> float:
    # max_overflow -1 (or pool_size 0) means no limit.
    size = int(pool.size())
    overflow = _compat.max_overflow(pool)
    if overflow is None:
        return math.nan
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
