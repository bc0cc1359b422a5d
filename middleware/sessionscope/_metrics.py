"""Prometheus metric families from the catalogue, and per-database children resolved once.

``Metrics.on(registry, namespace)`` returns the one set of families for that registry and
namespace, so several middlewares (one per database) share them. ``Metrics.for_db(name)``
resolves the label children of one database once; per-route children are resolved on a route's
first request and cached, up to ``max_routes`` distinct routes, after which new routes are
folded into ``__other__``. Nothing on the request path calls ``.labels()`` more than once per
route and database. Every update goes through prometheus_client's public methods (``inc``,
``dec``, ``set``, ``observe``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Generic, TypeVar, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from . import _outcome as oc
from . import catalogue as cat
from ._session_totals import RouteTotals, SessionTotals

OTHER_ROUTE: Final = "__other__"
"""The route label of routes beyond the cap on distinct routes."""
DEFAULT_MAX_ROUTES: Final = 500
_CACHE_ATTRIBUTE: Final = "_sessionscope_metrics"
_MULTIPROC_ENV: Final = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")

_CREATED_OFF_ENV: Final = "PROMETHEUS_DISABLE_CREATED_SERIES"


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode: the environment variable it reads
    (``PROMETHEUS_MULTIPROC_DIR``) is set."""
    return any(name in os.environ for name in _MULTIPROC_ENV)


class Metrics:
    """The metric families of one namespace on one registry."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace
        self._families: dict[str, Family] = {
            m.name: _family(m, namespace, registry) for m in cat.CATALOGUE
        }
        self._dbs: dict[str, DbMetrics] = {}
        self._lock = threading.Lock()

    @classmethod
    def on(
        cls, registry: CollectorRegistry | None = None, namespace: str = cat.DEFAULT_NAMESPACE
    ) -> Metrics:
        """The shared families for ``registry`` (default: prometheus_client's) and ``namespace``."""
        registry = REGISTRY if registry is None else registry
        # Kept on the registry itself: the families live exactly as long as the registry.
        cache: dict[str, Metrics] = registry.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
        metrics = cache.get(namespace)
        if metrics is None:
            metrics = cache[namespace] = cls(registry, namespace)
        return metrics

    def __getitem__(self, metric: cat.Metric) -> Any:
        return self._families[metric.name]

    def for_db(self, db: str, *, max_routes: int = DEFAULT_MAX_ROUTES) -> DbMetrics:
        """Children of database ``db``, created once."""
        with self._lock:
            found = self._dbs.get(db)
            if found is None:
                found = self._dbs[db] = DbMetrics(self, db, max_routes)
            return found


class RouteMetrics:
    """The per-route children of one database."""

    __slots__ = ("leaks_detected", "leaks_resolved", "sessions", "use_after_close")

    def __init__(self, metrics: Metrics, db: str, route: str) -> None:
        self.sessions = RouteTotals(metrics, db, route)
        """Closed sessions, seconds held and statements, updated by :class:`SessionTotals`."""
        self.leaks_detected = metrics[cat.SESSION_LEAKS_DETECTED].labels(db, route)
        self.leaks_resolved = metrics[cat.SESSION_LEAKS_RESOLVED].labels(db, route)
        self.use_after_close = metrics[cat.SESSION_USE_AFTER_CLOSE].labels(db, route)


class DbMetrics:
    """Children of one database (label ``db``), resolved once, routes on first sight."""

    def __init__(self, metrics: Metrics, db: str, max_routes: int) -> None:
        self.metrics = metrics
        self.db = db
        self.max_routes = max_routes
        self.sessions = SessionTotals(metrics, db)
        """Sessions open, and the duration, statement and commit histograms."""
        rollbacks = metrics[cat.SESSION_ROLLBACKS]
        self.rollbacks = {r: rollbacks.labels(db, r) for r in oc.ROLLBACK_REASONS}
        errors = metrics[cat.SESSION_ERRORS]
        self.errors = {(p, t): errors.labels(db, p, t) for p in oc.PHASES for t in cat.ERROR_TYPES}
        self.leak_suspected = metrics[cat.SESSIONS_LEAK_SUSPECTED].labels(db)
        self.oldest_age = metrics[cat.SESSION_OLDEST_AGE].labels(db)
        self.gc_unclosed = metrics[cat.SESSIONS_GC_UNCLOSED].labels(db)
        self.leak_threshold = metrics[cat.LEAK_THRESHOLD].labels(db)
        self.pool_pending = metrics[cat.POOL_PENDING].labels(db)
        self.pool_timeouts = metrics[cat.POOL_TIMEOUTS].labels(db)
        self._routes: dict[str, RouteMetrics] = {}
        self._lock = threading.Lock()

    def route(self, route: str) -> RouteMetrics:
        """The children of ``route``; beyond ``max_routes`` distinct routes, ``__other__``."""
        found = self._routes.get(route)
        if found is not None:
            return found
        with self._lock:
            found = self._routes.get(route)
            if found is None:
                if len(self._routes) >= self.max_routes:
                    route = OTHER_ROUTE
                    found = self._routes.get(route)
                if found is None:
                    found = self._routes[route] = RouteMetrics(self.metrics, self.db, route)
            return found

    def rollback(self, reason: str) -> None:
        """Count a rollback; unknown reasons (a custom commit_on's status class) are created."""
        child = self.rollbacks.get(reason)
        if child is None:
            child = self.rollbacks[reason] = self.metrics[cat.SESSION_ROLLBACKS].labels(
                self.db, reason
            )
        child.inc()

    def error(self, phase: str, exc: BaseException) -> None:
        """Count an error of ``phase`` under its bounded ``error_type``."""
        self.errors[(phase, error_type(exc))].inc()


def error_type(exc: BaseException) -> str:
    """The class name of ``exc`` or of its nearest base in the closed list; else ``other``."""
    for klass in type(exc).__mro__:
        if klass.__name__ in _ERROR_TYPES:
            return klass.__name__
    return "other"


_ERROR_TYPES: Final = frozenset(cat.ERROR_TYPES)
_Child = TypeVar("_Child")


class _CountedFamily(Collector, Generic[_Child]):
    """A family of children kept as plain numbers, one per label set, registered on
    ``registry``; :class:`CountedHistogram` and :class:`CountedCounter` say how they export."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        new_child: Callable[[], _Child],
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._new_child = new_child
        self._children: dict[tuple[str, ...], _Child] = {}
        self._lock = threading.Lock()
        self._created = os.environ.get(_CREATED_OFF_ENV, "false").lower() != "true"
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        """The child of the label ``values`` (in the order of the label names)."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {key}")
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child


class CountedHistogram(_CountedFamily["HistogramChild"]):
    """A histogram family that keeps its counts as plain numbers and exports them through
    prometheus_client's public collector interface (``collect()``).

    prometheus_client's own ``Histogram.observe`` walks the buckets in Python and takes two
    locks: about four times what one ``bisect`` and one lock cost here, and a request makes
    four observations. A scrape gives the same samples as a ``Histogram`` with the same
    buckets. Used in a single process only: under multiprocess mode the values must go to
    prometheus_client's files, so the families are its own ``Histogram``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        le: Callable[[float], str] = floatToGoString  # untyped in prometheus_client
        self._les = [le(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry, lambda: HistogramChild(bounds))

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            counts, total, created = child.read()
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(key), buckets, total)
            if self._created:
                labels = dict(zip(self._labelnames, key, strict=True))
                family.samples.append(Sample(f"{self._name}_created", labels, created))
        return [family]


class HistogramChild:
    """One label set's observations: counts per bucket (not cumulative) and their sum."""

    __slots__ = ("_bounds", "_counts", "_created", "_lock", "_total")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._total = 0.0
        self._created = time.time()
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        """Count one observation of ``amount`` in the first bucket whose bound is >= it."""
        index = bisect_left(self._bounds, amount)
        with self._lock:
            self._total += amount
            if amount == amount:  # NaN: in the sum only, as prometheus_client counts it
                self._counts[index] += 1

    def read(self) -> tuple[list[int], float, float]:
        """The counts per bucket, the sum and the creation time, read together."""
        with self._lock:
            return list(self._counts), self._total, self._created


class CountedCounter(_CountedFamily["CounterChild"]):
    """A counter family that keeps its values as plain numbers and exports them through
    prometheus_client's public collector interface, with the same samples as a ``Counter``;
    in a single process only (see :class:`CountedHistogram`)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        super().__init__(name, documentation, labelnames, registry, CounterChild)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            value, created = child.read()
            family.add_metric(list(key), value, created=created if self._created else None)
        return [family]


class CounterChild:
    """One label set's count."""

    __slots__ = ("_created", "_lock", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._created = time.time()
        self._lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (not negative, as for prometheus_client's ``Counter``)."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._lock:
            self._value += amount

    def read(self) -> tuple[float, float]:
        """The value and the creation time."""
        with self._lock:
            return self._value, self._created


Family = Counter | Gauge | Histogram | CountedHistogram | CountedCounter


def _family(metric: cat.Metric, namespace: str, registry: CollectorRegistry) -> Family:
    labels = metric.all_labels
    name = f"{namespace}_{metric.name}"
    if metric.kind == "counter":
        if multiprocess_mode():
            return Counter(name, metric.help, labels, registry=registry)
        return CountedCounter(name, metric.help, labels, registry)
    if metric.kind == "gauge":
        return Gauge(
            name,
            metric.help,
            labels,
            registry=registry,
            multiprocess_mode=cast(Any, metric.multiprocess_mode),
        )
    if multiprocess_mode():
        return Histogram(name, metric.help, labels, registry=registry, buckets=metric.buckets)
    return CountedHistogram(name, metric.help, labels, metric.buckets, registry)
