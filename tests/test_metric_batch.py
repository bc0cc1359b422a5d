"""A session's open and close, as the metrics show them: the same samples as prometheus_client's
own updates of each series, from any number of threads, in and out of multiprocess mode."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sessionscope import catalogue as cat
from sessionscope import metrics as metrics_module

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
