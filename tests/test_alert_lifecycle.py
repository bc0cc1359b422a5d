"""A user can watch the alerts go pending, fire and resolve against the demo.

The shipped rules are loaded into a real Prometheus scraping the demo app (both on loopback),
with one change for tests that cannot wait minutes: every ``for:`` longer than 5 s becomes
``for: 5s`` (``DbSessionLeakSuspected`` has ``for: 5m``). The demo's leak threshold is 1 s and
its pool (5 + 5 connections) gives up after 2 s. The alerts are caused the way docs/alerts.md
tells a user to: ``python -m demo_app.load --scenario leak`` (stopped with Ctrl-C once the
alert fires) and the load generator's mixes (those tests are ``slow``: about 45 s together).
The shipped timing (``for: 5m`` ...) is proven by ``promtool test rules`` (tests/test_alerts.py
runs the cases in alerts_test.yml).
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
LEAK = "DbSessionLeakSuspected"
FOR = "5s"
WAIT = 60.0
"""The most any step may take on a slow machine; a step normally takes a few seconds."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    prometheus_bin = prometheus()
    tmp = tmp_path_factory.mktemp("alerts")
    gen = generator()
    rules = gen.alert_rules_document()
    shortened = {}
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        if rule["for"] != "0m":
            shortened[rule["alert"]] = rule["for"]
            rule["for"] = FOR
    assert shortened[LEAK] == "5m"
    rule_file = tmp / "alerts.yml"
    rule_file.write_text(gen.to_yaml(rules))
    env = {
        "DATABASE_URL": f"sqlite:///{tmp / 'demo.db'}",
        "DEMO_LEAK_THRESHOLD": "1",
        "DEMO_POOL_TIMEOUT": "2",
    }
    with demo_and_prometheus(prometheus_bin, tmp, JOB, [rule_file], env) as running:
        running.prometheus.wait_for(f'up{{job="{JOB}"}} == 1', present=True, timeout=WAIT)
        yield running


def active(stack: DemoStack, name: str) -> list[dict[str, Any]]:
    """The pending and firing alerts named ``name``."""
    alerts: list[dict[str, Any]] = stack.prometheus.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]


def watch(stack: DemoStack, name: str, until: str) -> list[str]:
    """The alert's states (``inactive`` when Prometheus lists it not), in the order seen,
    until it is in state ``until``."""
    seen: list[str] = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = active(stack, name)
        state = found[0]["state"] if found else "inactive"
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == until:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{name} did not become {until} in {WAIT} s: saw {seen}")


def load(stack: DemoStack, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m demo_app.load`` against the demo, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "demo_app.load", "--url", stack.app_url, "--no-progress", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def test_the_leak_alert_goes_pending_then_firing_then_resolves_when_the_leak_scenario_stops(
    stack: DemoStack, tmp_path: Path
) -> None:
    watch(stack, LEAK, until="inactive")  # nothing left from another test
    out = tmp_path / "load.out"
    with out.open("wb") as load_out:
        holder = subprocess.Popen(
            [
                *(sys.executable, "-m", "demo_app.load", "--url", stack.app_url),
                *("--scenario", "leak", "--hold-seconds", "600", "--no-progress"),
            ],
            cwd=ROOT,
            stdout=load_out,
            stderr=subprocess.STDOUT,
        )
        try:
            assert watch(stack, LEAK, until="firing") == ["inactive", "pending", "firing"]
            firing = active(stack, LEAK)
            # Twice the threshold old: the very-old alert follows (docs/alerts.md says so).
            assert watch(stack, "DbSessionVeryOld", until="firing")[-1] == "firing"
            assert holder.poll() is None, "the leak scenario ended before the alerts fired"
        finally:
            holder.send_signal(signal.SIGINT)  # Ctrl-C: the demo lets go of the session
            status = holder.wait(timeout=WAIT)
    assert status == 130, out.read_text()
    assert "interrupted" in out.read_text()
    assert len(firing) == 1
    alert = firing[0]
    instance = stack.app_url.removeprefix("http://")
    assert alert["labels"] == {
        "alertname": LEAK,
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
    assert watch(stack, LEAK, until="inactive") in (["firing", "inactive"], ["inactive"])
    assert watch(stack, "DbSessionVeryOld", until="inactive")[-1] == "inactive"
    prom = stack.prometheus
    assert prom.query(f'ALERTS{{alertname="{LEAK}"}}') == []
    resolved = prom.query(f'db_session_leaks_resolved_total{{job="{JOB}", route="/hold"}}')
    assert [float(r["value"][1]) for r in resolved] == [1.0]
    assert prom.query(f'db_sessions_open{{job="{JOB}"}} > 0') == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mix", "alert", "labels"),
    [
        # First: commit_fail's failed commits are error rollbacks too and would fire it.
        ("boom=1,read=4", "DbRollbackRatioHigh", {}),
        ("commit_fail=1", "DbCommitErrors", {"error_type": "IntegrityError"}),
        ("audit_late=1", "DbSessionLateWrites", {}),
        ("use_after_close=1", "DbSessionUseAfterClose", {"route": "/fire-and-forget"}),
    ],
)
def test_the_demo_mix_docs_alerts_md_names_makes_the_alert_fire(
    stack: DemoStack, mix: str, alert: str, labels: dict[str, str]
) -> None:
    assert active(stack, alert) == []
    done = load(stack, "--mix", mix, "--duration", "2", "--rate", "5")
    assert done.returncode == 0, done.stdout + done.stderr
    seen = watch(stack, alert, until="firing")
    if alert != "DbRollbackRatioHigh":  # for: 0m, the others: no pending step
        assert set(seen) <= {"inactive", "firing"}
    (firing,) = active(stack, alert)
    assert labels.items() <= firing["labels"].items()
    assert firing["annotations"]["runbook_url"] == f"docs/alerts.md#{alert.lower()}"


@pytest.mark.slow
def test_an_exhausted_pool_makes_its_three_alerts_fire(stack: DemoStack, tmp_path: Path) -> None:
    alerts = ("DbPoolNearExhaustion", "DbPoolPendingRequests", "DbPoolCheckoutTimeouts")
    for name in alerts:
        assert active(stack, name) == []
    out = tmp_path / "load.out"
    # 12 requests at a time holding their connection 4 s against a pool of 10 that waits 2 s.
    with out.open("wb") as load_out:
        exhaust = subprocess.Popen(
            [
                *(sys.executable, "-m", "demo_app.load", "--url", stack.app_url),
                *("--mix", "slow=1", "--slow-seconds", "4", "--concurrency", "12"),
                *("--rate", "0", "--duration", "20", "--no-progress"),
            ],
            cwd=ROOT,
            stdout=load_out,
            stderr=subprocess.STDOUT,
        )
        try:
            seen = {name: watch(stack, name, until="firing") for name in alerts}
            assert exhaust.poll() is None, "the load ended before the alerts fired"
        finally:
            status = exhaust.wait(timeout=WAIT)
    assert status == 1, out.read_text()  # the 503s are unexpected statuses for /slow
    assert "503:" in out.read_text()
    assert "pending" in seen["DbPoolNearExhaustion"] + seen["DbPoolPendingRequests"]
    assert "pending" not in seen["DbPoolCheckoutTimeouts"]  # for: 0m
