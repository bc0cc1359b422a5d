"""The Prometheus rules: valid, unit-tested with promtool, documented, and true to the catalogue."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from .prom_support import DASHBOARDS, ROOT, catalogue_problems, generator
from .prometheus_tools import promtool

RULES = DASHBOARDS / "prometheus" / "alerts.yml"
RULE_TESTS = DASHBOARDS / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "alerts.md"

REQUIRED_ALERTS = {
    "DbSessionLeakSuspected": "leak suspected",
    "DbSessionVeryOld": "very old session",
    "DbConnectionsHeldWithoutTraffic": "connections held without traffic",
    "DbPoolNearExhaustion": "pool near exhaustion",
    "DbPoolPendingRequests": "pending requests",
    "DbPoolCheckoutTimeouts": "checkout timeouts",
    "DbCommitErrors": "commit errors",
    "DbSessionCleanupFailed": "cleanup failures",
    "DbRollbackRatioHigh": "high rollback ratio",
    "DbStatementsPerRequestHigh": "N+1",
}


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return generator()


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, check=False, cwd=RULES.parent
    )


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_promtool_check_rules_accepts_the_rule_file(gen: ModuleType) -> None:
    done = run_promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(gen.alerts()) + len(gen.recording_rules())
    assert f"SUCCESS: {count} rules found" in done.stdout


def test_promtool_unit_tests_pass_each_alert_firing_on_bad_and_silent_on_healthy_series() -> None:
    done = run_promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_required_alert_exists(gen: ModuleType) -> None:
    names = {a.name for a in gen.alerts()}
    assert set(REQUIRED_ALERTS) <= names


def test_every_alert_has_a_firing_and_a_silent_unit_test(gen: ModuleType) -> None:
    doc = gen.alert_tests_document()
    by_alert: dict[str, list[int]] = {}
    for test in doc["tests"]:
        for case in test["alert_rule_test"]:
            by_alert.setdefault(case["alertname"], []).append(len(case["exp_alerts"]))
    for alert in gen.alerts():
        counts = by_alert.get(alert.name, [])
        assert any(counts), (alert.name, "no case where it fires")
        assert 0 in counts, (alert.name, "no case where it stays silent")


def test_every_alert_has_summary_description_severity_and_a_runbook_section(
    gen: ModuleType,
) -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for group in gen.alert_rules_document()["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            notes = rule["annotations"]
            assert notes["summary"], rule["alert"]
            assert len(notes["description"]) > 40, rule["alert"]
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            url = notes["runbook_url"]
            assert url.startswith(gen.RUNBOOK_BASE + "#"), url
            assert url.split("#", 1)[1] in anchors, f"no runbook section for {rule['alert']}"


def test_alert_and_recording_expressions_use_only_catalogue_metrics_and_labels(
    gen: ModuleType,
) -> None:
    problems = {a.name: catalogue_problems(a.expr) for a in gen.alerts()}
    problems |= {record: catalogue_problems(expr) for record, expr in gen.recording_rules()}
    assert {k: v for k, v in problems.items() if v} == {}


def test_recording_rule_names_follow_level_metric_operations(gen: ModuleType) -> None:
    for record, _ in gen.recording_rules():
        level, metric, operations = record.split(":")
        assert level, record
        assert metric.startswith("db_"), record
        assert operations, record


def test_rules_follow_the_namespace_given_to_the_generator(gen: ModuleType, tmp_path: Path) -> None:
    rules = gen.to_yaml(gen.alert_rules_document("myapp_db"))
    assert "db_sessions" not in rules.replace("myapp_db_sessions", "")
    file = tmp_path / "rules.yml"
    file.write_text(rules)
    done = run_promtool("check", "rules", str(file))
    assert done.returncode == 0, done.stdout + done.stderr
