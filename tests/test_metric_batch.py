"""A session's open and close, as the metrics show them: the same samples as prometheus_client's
own updates of each series, from any number of threads, in and out of multiprocess mode."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sessionscope import _metrics as metrics_module
from sessionscope import catalogue as cat

CLOSES = [
    ("/a", "commit", 0.004, 2, 0.0009),
    ("/a", "rollback", 0.02, 1, None),
    ("/b/{id}", "unused", 0.0001, 0, None),
    ("/b/{id}", "commit", 61.0, 1000, 11.0),  # past the last finite buckets
    ("/a", "commit", 0.005, 3, 0.001),  # exactly on bucket bounds
    ("/task", "commit", 0.3, None, None),  # a per-task session: statements not counted
]


def exposition(registry: CollectorRegistry) -> list[str]:
    """The scrape's sample lines, without the creation timestamps (they differ)."""
    return [
        line
        for line in generate_latest(registry).decode().splitlines()
        if not line.startswith("#") and "_created" not in line
    ]


def by_hand(registry: CollectorRegistry) -> None:
    """What the closes of CLOSES must show, written with prometheus_client's own calls."""
    ns = cat.DEFAULT_NAMESPACE
    families = {m.name: m for m in cat.CATALOGUE}

    def histogram(metric: cat.Metric, labels: list[str]) -> Histogram:
        return Histogram(
            f"{ns}_{metric.name}", metric.help, labels, registry=registry, buckets=metric.buckets
        )

    opened = Gauge(f"{ns}_{cat.SESSIONS_OPEN.name}", "", ["db"], registry=registry)
    closed = Counter(
        f"{ns}_{cat.SESSIONS_CLOSED.name}", "", ["db", "route", "outcome"], registry=registry
    )
    held = Counter(f"{ns}_{cat.SESSION_HELD.name}", "", ["db", "route"], registry=registry)
    statements = Counter(f"{ns}_{cat.STATEMENTS.name}", "", ["db", "route"], registry=registry)
    duration = histogram(families[cat.SESSION_DURATION.name], ["db", "outcome"])
    per_session = histogram(families[cat.SESSION_STATEMENTS.name], ["db"])
    commit = histogram(families[cat.SESSION_COMMIT_DURATION.name], ["db"])
    opened.labels("default").inc(7)
    for route, outcome, seconds, count, commit_seconds in CLOSES:
        closed.labels("default", route, outcome).inc()
        held.labels("default", route).inc(seconds)
        duration.labels("default", outcome).observe(seconds)
        if count is not None:
            if count:
                statements.labels("default", route).inc(count)
            per_session.labels("default").observe(count)
        if commit_seconds is not None:
            commit.labels("default").observe(commit_seconds)
        opened.labels("default").dec()


def session_lines(registry: CollectorRegistry) -> list[str]:
    names = (
        "sessions_open",
        "sessions_closed_total",
        "session_held_seconds_total",
        "statements_total",
        "session_duration_seconds",
        "session_statements",
        "session_commit_duration_seconds",
    )
    return sorted(
        line
        for line in exposition(registry)
        if any(line.startswith(f"{cat.DEFAULT_NAMESPACE}_{n}") for n in names)
        and ('db="default"' in line)
        # series that exist in one registry only at 0 (children created up front)
        and not line.endswith(" 0.0")
    )


@pytest.mark.parametrize("multiprocess", [False, True])
def test_session_opens_and_closes_scrape_exactly_like_prometheus_clients_own_updates(
    monkeypatch: pytest.MonkeyPatch, multiprocess: bool
) -> None:
    if multiprocess:
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent-not-written")
    assert metrics_module.multiprocess_mode() is multiprocess
    registry = CollectorRegistry()
    db = metrics_module.Metrics.on(registry).for_db("default")
    for _ in range(7):
        db.sessions.opened()
    for route, outcome, seconds, statements, commit in CLOSES:
        db.sessions.closed(db.route(route).sessions, outcome, seconds, statements, commit)
    expected = CollectorRegistry()
    by_hand(expected)

    assert session_lines(registry) == session_lines(expected)
    scraped = exposition(registry)
    assert 'db_sessions_open{db="default"} 1.0' in scraped
    assert 'db_statements_total{db="default",route="/a"} 6.0' in scraped


def test_session_closes_from_many_threads_at_once_are_all_counted() -> None:
    registry = CollectorRegistry()
    db = metrics_module.Metrics.on(registry).for_db("default")
    route = db.route("/r").sessions
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for i in range(2_000):
            db.sessions.opened()
            db.sessions.closed(route, "commit", 0.0005 if i % 2 else 0.5, 1, None)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"db_{name}", {"db": "default", **labels})

    assert value("sessions_closed_total", route="/r", outcome="commit") == 16_000
    assert value("statements_total", route="/r") == 16_000
    assert value("session_duration_seconds_count", outcome="commit") == 16_000
    assert value("session_duration_seconds_sum", outcome="commit") == pytest.approx(
        8_000 * 0.0005 + 8_000 * 0.5
    )
    assert value("sessions_open") == 0


BUCKETS = (0, 0.001, 0.005, 0.25, 1.0, 60.0)
VALUES = (0, 0.0004, 0.001, 0.0010001, 0.3, 1.0, 59.9, 60.0, 61.0, 1e9, -2.0, 0.25)


def test_a_counted_histogram_scrapes_exactly_like_prometheus_clients_histogram() -> None:
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    own, counted = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["db", "outcome"], buckets=BUCKETS, registry=own)
    ours = metrics_module.CountedHistogram(
        "h_seconds", "h", ["db", "outcome"], BUCKETS, registry=counted
    )
    for value in VALUES:
        histogram.labels("a", "commit").observe(value)
        ours.labels("a", "commit").observe(value)
    histogram.labels("a", "rollback")  # a child that never observed anything
    ours.labels("a", "rollback")

    def lines(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines() if "_created" not in line]

    assert lines(generate_latest(counted)) == lines(generate_latest(own))
    assert lines(openmetrics(counted)) == lines(openmetrics(own))
    created = [line for line in generate_latest(counted).decode().splitlines()]
    assert sum(line.startswith("h_seconds_created{") for line in created) == 2
    assert counted.get_sample_value("h_seconds_count", {"db": "a", "outcome": "commit"}) == 12
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Histogram("h_seconds", "again", registry=counted)  # its names are claimed
    with pytest.raises(ValueError, match="expected labels"):
        ours.labels("a")


def test_a_counted_histogram_counts_every_observation_from_many_threads() -> None:
    registry = CollectorRegistry()
    child = metrics_module.CountedHistogram("h", "h", [], BUCKETS, registry=registry).labels()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for i in range(5_000):
            child.observe(0.0005 if i % 2 else 0.5)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.get_sample_value("h_count") == 40_000
    assert registry.get_sample_value("h_bucket", {"le": "0.001"}) == 20_000
    assert registry.get_sample_value("h_sum") == pytest.approx(20_000 * 0.0005 + 20_000 * 0.5)


def test_in_multiprocess_mode_counters_and_histograms_are_prometheus_clients_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent-not-written")
    metrics = metrics_module.Metrics.on(CollectorRegistry())
    assert isinstance(metrics[cat.SESSION_DURATION], Histogram)
    assert isinstance(metrics[cat.SESSIONS_CLOSED], Counter)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    metrics = metrics_module.Metrics.on(CollectorRegistry())
    assert isinstance(metrics[cat.SESSION_DURATION], metrics_module.CountedHistogram)
    assert isinstance(metrics[cat.SESSIONS_CLOSED], metrics_module.CountedCounter)


def test_a_counted_counter_scrapes_exactly_like_prometheus_clients_counter() -> None:
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    own, counted = CollectorRegistry(), CollectorRegistry()
    counter = Counter("c_total", "c", ["db"], registry=own)
    ours = metrics_module.CountedCounter("c_total", "c", ["db"], registry=counted)
    for value in (1, 2.5, 0, 3):
        counter.labels("a").inc(value)
        ours.labels("a").inc(value)
    counter.labels("b")
    ours.labels("b")

    def lines(text: bytes) -> list[str]:
        return [line for line in text.decode().splitlines() if "_created" not in line]

    assert lines(generate_latest(counted)) == lines(generate_latest(own))
    assert lines(openmetrics(counted)) == lines(openmetrics(own))
    assert counted.get_sample_value("c_total", {"db": "a"}) == 6.5
    with pytest.raises(ValueError, match="non-negative"):
        ours.labels("a").inc(-1)
    assert counted.get_sample_value("c_total", {"db": "a"}) == 6.5
