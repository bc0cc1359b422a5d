"""``dashboards/compose.yaml``: the demo, Prometheus and Grafana wired to the repository's files.

Parsed as YAML and checked against the files it mounts and the configs that must agree with
it (Grafana's provisioning, Prometheus' scrape target). Docker's own ``docker compose config``
is not run: no machine this suite runs on has the compose plugin, and a test that can only skip
proves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .prom_support import DASHBOARDS, ROOT

COMPOSE_FILE = DASHBOARDS / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def load_yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (resolved against the compose file's folder)."""
    found: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        assert host.startswith("."), f"{volume}: only paths in the repository are mounted"
        found[container] = (DASHBOARDS / host).resolve()
    return found


def test_compose_runs_the_demo_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"demo", "prometheus", "grafana"}
    assert services["prometheus"]["depends_on"] == ["demo"]
    assert services["grafana"]["depends_on"] == ["prometheus"]
    assert "uvicorn demo_app.main:app" in services["demo"]["command"]
    assert (ROOT / "demo_app" / "main.py").is_file()


def test_every_file_compose_mounts_exists_in_the_repository(compose: dict[str, Any]) -> None:
    missing = [
        f"{name}: {host}"
        for name, service in compose["services"].items()
        for host in mounts(service).values()
        if not host.exists()
    ]
    assert missing == []
    assert mounts(compose["services"]["demo"])["/src"] == ROOT
    # The demo installs sessionscope from these, copied out of the read-only checkout.
    for name in ("pyproject.toml", "README.md", "middleware"):
        assert f" {name}" in compose["services"]["demo"]["command"]
        assert (ROOT / name).exists()


def test_grafana_gets_the_provisioning_and_the_dashboard_where_the_provider_looks(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    grafana_mounts = mounts(grafana)
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    assert provisioning == DASHBOARDS / "grafana" / "provisioning"
    assert (provisioning / "datasources" / "prometheus.yml").is_file()
    provider = load_yaml(provisioning / "dashboards" / "sessionscope.yml")["providers"][0]
    dashboard_path = provider["options"]["path"]
    assert grafana_mounts[dashboard_path] == DASHBOARDS / "grafana" / "sessionscope.json"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_path


def test_prometheus_shares_the_demos_network_so_every_address_agrees(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    assert prometheus["network_mode"] == "service:demo"
    prometheus_mounts = mounts(prometheus)
    config_path = prometheus_mounts["/etc/prometheus/prometheus.yml"]
    assert config_path == DASHBOARDS / "prometheus" / "prometheus.yml"
    assert (
        prometheus_mounts["/etc/prometheus/alerts.yml"] == DASHBOARDS / "prometheus" / "alerts.yml"
    )
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "--web.listen-address=0.0.0.0:9090" in prometheus["command"]
    # The scrape target is the demo's port inside the shared network namespace.
    config = load_yaml(config_path)
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert "--port 8000" in services["demo"]["command"]
    # Grafana reaches Prometheus through the demo service's name.
    datasources = load_yaml(
        DASHBOARDS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    )
    assert datasources["datasources"][0]["url"] == "http://demo:9090"


def test_the_published_ports_are_on_loopback_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["demo"]["ports"] == ["127.0.0.1:8000:8000", "127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert "ports" not in services["prometheus"]  # published by the demo it shares a network with
