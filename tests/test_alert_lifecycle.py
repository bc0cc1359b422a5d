"""A user can watch the leak alert go pending, fire and resolve against the demo.

The shipped rules are loaded into a real Prometheus scraping the demo app (both on loopback),
with one change for a test that cannot wait five minutes: ``DbSessionLeakSuspected`` gets
``for: 5s`` instead of ``for: 5m`` and the demo's leak threshold is 1 s. The leak is made the way
docs/alerts.md tells a user to: ``python -m demo_app.load --scenario leak``, stopped with
Ctrl-C (SIGINT) once the alert fires. The five-minute timing of the shipped rule itself is
proven by ``promtool test rules`` (tests/test_alerts.py, the cases in alerts_test.yml).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .prom_support import ROOT, DemoStack, demo_and_prometheus, generator
from .prometheus_tools import prometheus

JOB = "sessionscope-alerts"
ALERT = "DbSessionLeakSuspected"
FOR = "5s"
WAIT = 60.0
"""The most any step may take on a slow machine; a step normally takes a few seconds."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    prometheus_bin = prometheus()
    tmp = tmp_path_factory.mktemp("alerts")
    gen = generator()
    rules = gen.alert_rules_document()
    leak = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert [r["for"] for r in leak] == ["5m"]
    leak[0]["for"] = FOR
    rule_file = tmp / "alerts.yml"
    rule_file.write_text(gen.to_yaml(rules))
    env = {"DATABASE_URL": f"sqlite:///{tmp / 'demo.db'}", "DEMO_LEAK_THRESHOLD": "1"}
    with demo_and_prometheus(prometheus_bin, tmp, JOB, [rule_file], env) as running:
        running.prometheus.wait_for(f'up{{job="{JOB}"}} == 1', present=True, timeout=WAIT)
        yield running


def leak_alerts(stack: DemoStack) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = stack.prometheus.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == ALERT]


def watch(stack: DemoStack, until: str) -> list[str]:
    """The alert's states (``inactive`` when Prometheus lists it not), in the order seen,
    until it is in state ``until``."""
    seen: list[str] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = leak_alerts(stack)
        state = found[0]["state"] if found else "inactive"
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == until:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{ALERT} did not become {until} in {WAIT} s: saw {seen}")


def test_the_leak_alert_goes_pending_then_firing_then_resolves_when_the_leak_scenario_stops(
    stack: DemoStack, tmp_path: Path
) -> None:
    assert leak_alerts(stack) == []
    out = tmp_path / "load.out"
    with out.open("wb") as load_out:
        load = subprocess.Popen(
            [
                *(sys.executable, "-m", "demo_app.load", "--url", stack.app_url),
                *("--scenario", "leak", "--hold-seconds", "600", "--no-progress"),
            ],
            cwd=ROOT,
            stdout=load_out,
            stderr=subprocess.STDOUT,
        )
        try:
            assert watch(stack, until="firing") == ["inactive", "pending", "firing"]
            firing = leak_alerts(stack)
            assert load.poll() is None, "the leak scenario ended before the alert fired"
        finally:
            load.send_signal(signal.SIGINT)  # Ctrl-C: the demo lets go of the session
            status = load.wait(timeout=WAIT)
    assert status == 130, out.read_text()
    assert "interrupted" in out.read_text()
    assert len(firing) == 1
    alert = firing[0]
    instance = stack.app_url.removeprefix("http://")
    assert alert["labels"] == {
        "alertname": ALERT,
        "severity": "warning",
        "job": JOB,
        "instance": instance,
        "db": "default",
    }
    assert alert["annotations"]["summary"] == (
        f"1 request session(s) open longer than the leak threshold on {instance} (db default)"
    )
    assert alert["annotations"]["runbook_url"] == "docs/alerts.md#dbsessionleaksuspected"

    # Resolved: Prometheus lists it no more (it may still have been firing at the first look).
    assert watch(stack, until="inactive") in (["firing", "inactive"], ["inactive"])
    prom = stack.prometheus
    assert prom.query(f'ALERTS{{alertname="{ALERT}"}}') == []
    resolved = prom.query(f'db_session_leaks_resolved_total{{job="{JOB}", route="/hold"}}')
    assert [float(r["value"][1]) for r in resolved] == [1.0]
    assert prom.query(f'db_sessions_open{{job="{JOB}"}} > 0') == []
