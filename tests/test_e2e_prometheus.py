"""End to end: the demo app under load, scraped by a real Prometheus, queried like Grafana would.

Starts the demo app (uvicorn, SQLite in a temporary directory, leak threshold 1 s) and
Prometheus (1 s scrapes, the shipped rules loaded), both on free loopback ports; drives the load
generator's scenario mix for a bounded time; then asserts that every catalogue metric is
exported, that every panel and alert expression of the shipped dashboard and rules is valid
PromQL and every panel returns data, that the shipped rules evaluate without errors, and that
the leak alert's expression is true while a request holds its session past the threshold and
false once it has finished.

With SESSIONSCOPE_E2E_DUMP=<file>, the range data of every panel is written to that JSON file
(``dashboards/render.py`` draws the pictures in ``dashboards/img/`` from it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sessionscope import catalogue as cat

from .prom_support import (
    DASHBOARDS,
    ROOT,
    Prometheus,
    PromQLError,
    demo_and_prometheus,
    generator,
    http_get,
    iter_targets,
    substitute,
)
from .prometheus_tools import prometheus

JOB = "sessionscope-e2e"
LEAK_THRESHOLD = 1.0
LOAD_SECONDS = 20
POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT = 4, 2, 2.0
DUMP_ENV = "SESSIONSCOPE_E2E_DUMP"


@dataclass
class Stack:
    app_url: str
    prometheus: Prometheus
    tmp: Path
    started: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = prometheus()
    tmp = tmp_path_factory.mktemp("e2e")
    env = {
        "DATABASE_URL": f"sqlite:///{tmp / 'demo.db'}",
        "DEMO_LEAK_THRESHOLD": str(LEAK_THRESHOLD),
        "DEMO_POOL_SIZE": str(POOL_SIZE),
        "DEMO_MAX_OVERFLOW": str(MAX_OVERFLOW),
        "DEMO_POOL_TIMEOUT": str(POOL_TIMEOUT),
    }
    rules = [DASHBOARDS / "prometheus" / "alerts.yml"]
    with demo_and_prometheus(prometheus_bin, tmp, JOB, rules, env) as running:
        yield Stack(running.app_url, running.prometheus, tmp, time.time())


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> Iterator[Stack]:
    """The stack after the load generator's default mix ran against it."""
    stack.prometheus.wait_for(f'up{{job="{JOB}"}} == 1', present=True, timeout=15)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "demo_app.load", "--url", stack.app_url),
            *("--duration", str(LOAD_SECONDS), "--rate", "30", "--concurrency", "8"),
            *("--slow-seconds", "2", "--seed", "7", "--no-progress"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=LOAD_SECONDS + 60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TOTAL" in done.stdout
    time.sleep(3)  # the last scrapes and rule evaluations
    yield stack
    if os.environ.get(DUMP_ENV):
        time.sleep(3)  # a few quiet seconds at the end of the pictures
        dump(stack, Path(os.environ[DUMP_ENV]))


def dump(stack: Stack, file: Path) -> None:
    """Write the range data of every panel query over the whole run, for dashboards/render.py."""
    dashboard = json.loads((DASHBOARDS / "grafana" / "sessionscope.json").read_text())
    end = time.time()
    panels = []
    for panel in dashboard["panels"]:
        entry: dict[str, Any] = {"title": panel["title"], "type": panel["type"], "targets": []}
        if panel["type"] != "row":
            entry["unit"] = panel["fieldConfig"]["defaults"]["unit"]
            for target in panel["targets"]:
                expr = substitute(target["expr"], job=JOB, range_="1m")
                entry["targets"].append(
                    {
                        "legend": target["legendFormat"],
                        "expr": expr,
                        "range": stack.prometheus.query_range(expr, stack.started, end, 1),
                    }
                )
        panels.append(entry)
    file.write_text(json.dumps({"start": stack.started, "end": end, "panels": panels}))


def test_every_catalogue_metric_is_scraped_with_its_labels(loaded: Stack) -> None:
    missing = []
    for metric in cat.CATALOGUE:
        name = metric.exported() + ("_bucket" if metric.kind == "histogram" else "")
        series = loaded.prometheus.api("series", **{"match[]": f'{name}{{job="{JOB}"}}'})
        if not series:
            missing.append(name)
            continue
        labels = set(series[0]) - {"__name__"}
        expected = set(metric.all_labels) | {"job", "instance"}
        expected |= {"le"} if metric.kind == "histogram" else set()
        assert labels == expected, name
    assert missing == []


def test_every_panel_expression_is_valid_promql_and_returns_data(loaded: Stack) -> None:
    dashboard = json.loads((DASHBOARDS / "grafana" / "sessionscope.json").read_text())
    checked = 0
    empty: list[str] = []
    for panel, target in iter_targets(dashboard):
        expr = substitute(target["expr"], job=JOB)
        result = loaded.prometheus.query(expr)  # raises PromQLError when invalid
        checked += 1
        if not result:
            empty.append(f"{panel['title']} {target['refId']}: {expr}")
    print(f"{checked} panel expressions checked against Prometheus")
    assert checked == sum(1 for _ in iter_targets(dashboard))
    assert empty == []


def test_every_alert_and_recording_expression_is_valid_promql(loaded: Stack) -> None:
    gen = generator()
    exprs = {a.name: a.expr for a in gen.alerts()}
    exprs |= {record: expr for record, expr in gen.recording_rules()}
    invalid = {}
    for name, expr in exprs.items():
        try:
            loaded.prometheus.query(expr)
        except PromQLError as exc:
            invalid[name] = str(exc)
    print(f"{len(exprs)} alert and recording expressions checked against Prometheus")
    assert invalid == {}


def test_the_shipped_rules_load_and_evaluate_without_errors(loaded: Stack) -> None:
    groups = loaded.prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(generator().alerts()) + len(generator().recording_rules())
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    recorded = loaded.prometheus.query("job_instance_db:db_pool_connections_used_per_max:ratio")
    assert recorded, "the pool utilisation recording rule produced no series"


def test_the_leak_alert_is_true_while_a_session_is_held_past_the_threshold_and_false_after(
    loaded: Stack,
) -> None:
    leak = next(a for a in generator().alerts() if a.name == "DbSessionLeakSuspected")
    prom = loaded.prometheus
    prom.wait_for(leak.expr, present=False, timeout=15)  # load's slow requests are over
    hold = 6.0
    answered: list[int] = []

    def slow_request() -> None:
        answered.append(http_get(f"{loaded.app_url}/slow?seconds={hold}", timeout=30)[0])

    started = time.monotonic()
    holder = threading.Thread(target=slow_request)
    holder.start()
    try:
        became_true = prom.wait_for(leak.expr, present=True, timeout=hold)
        assert LEAK_THRESHOLD <= became_true < hold
        value = float(prom.query(leak.expr)[0]["value"][1])
        assert value == 1
    finally:
        holder.join(timeout=30)
    assert answered == [200]
    prom.wait_for(leak.expr, present=False, timeout=10)
    assert time.monotonic() - started >= hold
    resolved = prom.query(f'sum(db_session_leaks_resolved_total{{job="{JOB}", route="/slow"}})')
    assert float(resolved[0]["value"][1]) >= 1


def test_an_exhausted_pool_shows_waiting_checkouts_and_timeouts_and_their_alerts_fire(
    loaded: Stack,
) -> None:
    alerts = {a.name: a.expr for a in generator().alerts()}
    prom = loaded.prometheus
    capacity = POOL_SIZE + MAX_OVERFLOW
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def slow_request() -> None:
        status = http_get(f"{loaded.app_url}/slow?seconds=3", timeout=30)[0]
        with lock:
            statuses[status] += 1

    holders = [threading.Thread(target=slow_request) for _ in range(capacity + 3)]
    for holder in holders:
        holder.start()
    try:
        pending = f'sum(db_pool_pending_requests{{job="{JOB}"}}) > 0'
        prom.wait_for(pending, present=True, timeout=POOL_TIMEOUT + 2)
        prom.wait_for(alerts["DbPoolNearExhaustion"], present=True, timeout=3)
    finally:
        for holder in holders:
            holder.join(timeout=30)
    assert statuses == {200: capacity, 503: 3}
    prom.wait_for(alerts["DbPoolCheckoutTimeouts"], present=True, timeout=5)
