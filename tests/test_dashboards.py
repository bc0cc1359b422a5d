"""The Grafana dashboard: generated from the catalogue, and clean by dashboard-linter's rules.

The checks follow grafana/dashboard-linter (datasource variable, job/instance in every query,
``$__rate_interval``, counters only inside ``rate``/``increase``, units, descriptions) plus the
layout (unique ids, grid positions) and a cross-check of every metric and label against the
library's metric catalogue. Provisioning and compose files are checked for what Grafana and
Prometheus need to find each other.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sessionscope import catalogue as cat

from .prom_support import (
    DASHBOARDS,
    catalogue_problems,
    generator,
    iter_targets,
    refs,
    substitute,
)
from .prometheus_tools import promtool

DASHBOARD_FILE = DASHBOARDS / "grafana" / "sessionscope.json"
GRAFANA_UNITS = {"short", "s", "ms", "ops", "reqps", "percentunit", "percent", "none"}
ROWS = ["Overview", "Pool", "Sessions", "Leaks", "Statements"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_generated_files_are_up_to_date_with_the_generator_and_catalogue() -> None:
    stale = [
        str(path.relative_to(DASHBOARDS))
        for path, content in generator().render().items()
        if not path.exists() or path.read_text() != content
    ]
    assert not stale, f"run `python dashboards/generate.py`: {stale} differ"


def test_generator_check_mode_reports_nothing_stale() -> None:
    assert generator().main(["--check"]) == 0


def test_the_dashboard_has_the_rows_of_the_design(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS
    assert len(panels(dashboard)) == 29


def test_datasource_is_a_template_variable_and_never_an_import_input(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    text = DASHBOARD_FILE.read_text()
    assert "__inputs" not in dashboard
    assert "DS_PROMETHEUS" not in text
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_job_instance_and_db_variables_are_chained_label_queries(
    dashboard: dict[str, Any],
) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("job", "instance", "db"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["datasource"]["uid"] == "${datasource}"
        assert v["includeAll"]
        assert v["multi"]
        assert v["definition"].startswith(f"label_values({cat.SESSIONS_OPEN.exported()}")
        assert v["definition"].endswith(f", {name})")
    assert "$job" in variables["instance"]["definition"]
    assert "$instance" in variables["db"]["definition"]


def test_every_selector_filters_on_job_instance_and_db(dashboard: dict[str, Any]) -> None:
    wanted = {"job": "$job", "instance": "$instance", "db": "$db"}
    for panel, target in iter_targets(dashboard):
        for ref in refs(target["expr"]):
            got = {k: ref.matchers.get(k) for k in wanted}
            assert got == {k: ("=~", v) for k, v in wanted.items()}, (panel["title"], ref.name)


def test_every_range_uses_rate_interval_except_instant_range_totals(
    dashboard: dict[str, Any],
) -> None:
    for panel, target in iter_targets(dashboard):
        windows = {r.range for r in refs(target["expr"]) if r.range is not None}
        allowed = {"$__rate_interval"} | ({"$__range"} if target.get("instant") else set())
        assert windows <= allowed, (panel["title"], windows)
        if re.search(r"\b(rate|increase)\(", target["expr"]):
            assert windows, panel["title"]


def test_metrics_and_labels_exist_in_the_catalogue_and_counters_are_only_rated(
    dashboard: dict[str, Any],
) -> None:
    problems = {
        f"{panel['title']} {target['refId']}": catalogue_problems(target["expr"])
        for panel, target in iter_targets(dashboard)
    }
    assert {k: v for k, v in problems.items() if v} == {}


def test_every_catalogue_metric_is_charted(dashboard: dict[str, Any]) -> None:
    charted = {
        ref.metric.name for _, t in iter_targets(dashboard) for ref in refs(t["expr"]) if ref.metric
    }
    assert {m.name for m in cat.CATALOGUE} - charted == set()


def test_every_panel_has_a_unit_and_a_description_of_what_bad_looks_like(
    dashboard: dict[str, Any],
) -> None:
    for panel in panels(dashboard):
        assert panel["fieldConfig"]["defaults"]["unit"] in GRAFANA_UNITS, panel["title"]
        assert len(panel["description"]) > 80, panel["title"]
        assert panel["targets"], panel["title"]


def test_panel_units_match_the_catalogue_units_of_plain_selectors(
    dashboard: dict[str, Any],
) -> None:
    for panel in panels(dashboard):
        found = [r for t in panel["targets"] for r in refs(t["expr"])]
        if "/" in str(panel["targets"]) or any(r.is_counter for r in found):
            continue  # ratios and rates have units of their own
        units = {r.metric.unit for r in found if r.metric}
        assert units == {panel["fieldConfig"]["defaults"]["unit"]}, panel["title"]


def test_panel_ids_are_unique_and_grid_positions_valid_and_non_overlapping(
    dashboard: dict[str, Any],
) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert min(g["x"], g["y"]) >= 0, panel["title"]
        assert min(g["w"], g["h"]) > 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_ref_ids_are_unique_per_panel_and_heatmaps_use_the_heatmap_format(
    dashboard: dict[str, Any],
) -> None:
    for panel in panels(dashboard):
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        if panel["type"] == "heatmap":
            assert all(t["format"] == "heatmap" for t in panel["targets"])
            assert all("_bucket" in t["expr"] and "le" in t["expr"] for t in panel["targets"])


def test_the_dashboard_is_provisioned_read_only_with_a_stable_uid(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["uid"] == "sessionscope-health"
    assert dashboard["editable"] is False
    assert dashboard["title"] == "Session leaks & pool health"


def test_every_panel_expression_is_valid_promql(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    tool = promtool()
    rules = {
        "groups": [
            {
                "name": "panels",
                "rules": [
                    {"record": f"panel:expr_{i}:check", "expr": substitute(t["expr"])}
                    for i, (_, t) in enumerate(iter_targets(dashboard))
                ],
            }
        ]
    }
    file = tmp_path / "panels.yml"
    file.write_text(json.dumps(rules))  # JSON is YAML
    done = subprocess.run(
        [tool, "check", "rules", str(file)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_a_prometheus_datasource() -> None:
    provisioning = DASHBOARDS / "grafana" / "provisioning"
    datasource = (provisioning / "datasources" / "prometheus.yml").read_text()
    assert "type: prometheus" in datasource
    assert "apiVersion: 1" in datasource
    provider = (provisioning / "dashboards" / "sessionscope.yml").read_text()
    assert "type: file" in provider
    path = re.search(r"path:\s*(\S+)", provider)
    assert path is not None
    compose = (DASHBOARDS / "compose.yaml").read_text()
    assert f"./grafana/sessionscope.json:{path.group(1)}" in compose


def test_prometheus_config_scrapes_the_demo_and_loads_the_rules() -> None:
    config = (DASHBOARDS / "prometheus" / "prometheus.yml").read_text()
    assert "alerts.yml" in config
    assert "127.0.0.1:8000" in config
    assert "metrics_path: /metrics/" in config


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    tool = promtool()
    done = subprocess.run(
        [tool, "check", "config", str(DASHBOARDS / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
