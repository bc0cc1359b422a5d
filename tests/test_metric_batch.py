"""Batched metric updates: what a scrape sees is what prometheus_client's own updates give."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sessionscope.metric_batch import MetricBatch

BUCKETS = (0, 0.001, 0.005, 0.25, 1.0, 60.0)
VALUES = (0, 0.0004, 0.001, 0.0010001, 0.3, 1.0, 59.9, 60.0, 61.0, 1e9, -2.0, 0.25)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The scrape's sample lines, without the creation timestamps (they differ)."""
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#") and "_created" not in line
    ]


def batched(interval: float = 3600.0) -> tuple[CollectorRegistry, MetricBatch]:
    registry = CollectorRegistry()
    batch = MetricBatch(interval=interval)
    batch.register_flush(registry)
    return registry, batch


def test_batched_histograms_counters_and_gauges_scrape_exactly_like_direct_updates() -> None:
    direct = CollectorRegistry()
    registry, batch = batched()
    children: list[tuple[Any, Any]] = []
    for reg in (direct, registry):
        children.append(
            (
                Histogram("h_seconds", "h", ["db"], buckets=BUCKETS, registry=reg).labels("a"),
                Counter("c", "c", ["db"], registry=reg).labels("a"),
            )
        )
    gauges = [Gauge("g", "g", ["db"], registry=reg).labels("a") for reg in (direct, registry)]
    (h_direct, c_direct), (h_child, c_child) = children
    h_batched, c_batched, g_batched = (
        batch.histogram(h_child),
        batch.counter(c_child),
        batch.counter(gauges[1]),
    )
    for v in VALUES:
        h_direct.observe(v)
        c_direct.inc(abs(v))
        gauges[0].inc(v)
        h_batched.observe(v)
        c_batched.inc(abs(v))
        g_batched.inc(v)
    gauges[0].inc(-3)
    g_batched.inc(-3)
    c_direct.inc(2)
    c_batched.inc(2)
    h_direct.observe(0.002)
    with batch.lock:
        h_batched.observe_held(0.002)

    assert exposition(registry) == exposition(direct)
    assert 'h_seconds_bucket{db="a",le="+Inf"} 13.0' in exposition(registry)
    # A second scrape adds nothing that was already written.
    assert exposition(registry) == exposition(direct)


def test_a_scrape_sees_every_update_made_before_it_without_waiting_for_the_interval() -> None:
    registry, batch = batched(interval=3600.0)
    counter = batch.counter(Counter("c", "c", registry=registry))
    counter.inc()
    counter.inc(2)
    assert registry.get_sample_value("c_total") == 3.0
    counter.inc()
    assert registry.get_sample_value("c_total") == 4.0


def test_updates_from_many_threads_at_once_are_all_counted() -> None:
    registry, batch = batched()
    counter = batch.counter(Counter("c", "c", registry=registry))
    histogram = batch.histogram(Histogram("h", "h", buckets=BUCKETS, registry=registry))
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for i in range(5_000):
            counter.inc()
            histogram.observe(0.0005 if i % 2 else 0.5)
            if i % 1000 == 0:
                batch.flush()  # flushes racing with updates lose nothing either

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.get_sample_value("c_total") == 40_000
    assert registry.get_sample_value("h_count") == 40_000
    assert registry.get_sample_value("h_bucket", {"le": "0.001"}) == 20_000
    assert registry.get_sample_value("h_sum") == pytest.approx(20_000 * 0.0005 + 20_000 * 0.5)


def test_a_scrape_that_skips_the_flush_sees_updates_once_the_interval_has_passed() -> None:
    registry, batch = batched(interval=0.05)
    counter = batch.counter(Counter("c", "c", registry=registry))
    filtered = registry.restricted_registry(["c_total"])  # a `name[]=` scrape
    counter.inc()
    batch.flush_due(time.perf_counter())  # not due yet: the last flush was just now
    assert _filtered_value(filtered) == 0.0
    time.sleep(0.06)
    batch.flush_due(time.perf_counter())
    assert _filtered_value(filtered) == 1.0


def test_in_multiprocess_mode_every_update_is_written_at_once() -> None:
    registry = CollectorRegistry()  # no flush registered: nothing may be held back
    batch = MetricBatch(immediate=True)
    counter = batch.counter(Counter("c", "c", registry=registry))
    histogram = batch.histogram(Histogram("h", "h", buckets=BUCKETS, registry=registry))
    counter.inc()
    histogram.observe(0.3)
    counter.inc()
    with batch.lock:
        histogram.observe_held(0.3)
    assert registry.get_sample_value("c_total") == 2.0
    assert registry.get_sample_value("h_count") == 2.0


def test_a_histogram_child_of_another_shape_is_observed_directly() -> None:
    observed: list[float] = []

    class Unusual:
        def observe(self, amount: float) -> None:
            observed.append(amount)

    _, batch = batched()
    histogram = batch.histogram(Unusual())
    histogram.observe(0.5)
    with batch.lock:
        histogram.observe_held(1.5)
    assert observed == [0.5, 1.5]


def _filtered_value(filtered: Any) -> float:
    for family in filtered.collect():
        for sample in family.samples:
            if sample.name == "c_total":
                return float(sample.value)
    return 0.0


def test_session_opens_and_closes_counted_in_bulk_scrape_exactly_like_direct_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sessionscope import metrics as metrics_module

    closes = [
        ("/a", "commit", 0.004, 2, 0.0009),
        ("/a", "rollback", 0.02, 1, None),
        ("/b/{id}", "unused", 0.0001, 0, None),
        ("/b/{id}", "commit", 61.0, 1000, 11.0),  # past the last finite buckets
        ("/a", "commit", 0.005, 3, 0.001),  # exactly on bucket bounds
        ("/task", "commit", 0.3, None, None),  # a per-task session: statements not counted
    ]
    scraped = []
    for direct in (True, False):
        monkeypatch.setattr(metrics_module, "multiprocess_mode", lambda direct=direct: direct)
        registry = CollectorRegistry()
        db = metrics_module.Metrics.on(registry).for_db("default")
        assert db.sessions.direct is direct
        for _ in range(7):
            db.sessions.opened()
        for route, outcome, seconds, statements, commit in closes:
            db.sessions.closed(db.route(route).sessions, outcome, seconds, statements, commit)
        scraped.append(exposition(registry))
    assert scraped[0] == scraped[1]
    assert 'db_sessions_open{db="default"} 1.0' in scraped[1]
    assert 'db_statements_total{db="default",route="/a"} 6.0' in scraped[1]
