"""Support for the dashboard, alert and end-to-end tests: PromQL scanning and processes.

Prometheus' tools are found by ``tests/prometheus_tools.py``: without them the tests that need
them skip, and with SESSIONSCOPE_REQUIRE_PROMETHEUS=1 a missing tool fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from sessionscope import catalogue as cat

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
TARGET_LABELS = frozenset({"job", "instance"})
"""Labels Prometheus adds to every scraped series."""


def generator() -> ModuleType:
    """``dashboards/generate.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "sessionscope_generate", DASHBOARDS / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ PromQL

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_RANGE_FUNCTION = re.compile(r"\b([a-z_]+)\(\s*$")
_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Ref:
    """One metric selector found in an expression."""

    name: str
    metric: cat.Metric | None
    """The catalogue entry it belongs to (``None``: not a sessionscope metric)."""
    suffix: str
    matchers: dict[str, tuple[str, str]]
    """label -> (operator, value)."""
    range: str | None
    function: str | None
    """The function the selector is the direct argument of (``rate``, ``increase`` ...)."""

    @property
    def is_counter(self) -> bool:
        """Whether the series only goes up (counters and histogram series)."""
        return self.metric is not None and (
            self.metric.kind == "counter" or self.metric.kind == "histogram"
        )

    @property
    def allowed_labels(self) -> set[str]:
        if self.metric is None:
            return set()
        extra = {"le"} if self.suffix == "_bucket" else set()
        return set(self.metric.all_labels) | TARGET_LABELS | extra


def series_names(namespace: str = cat.DEFAULT_NAMESPACE) -> dict[str, tuple[cat.Metric, str]]:
    """Every series name the catalogue exports -> (metric, suffix)."""
    names: dict[str, tuple[cat.Metric, str]] = {}
    for metric in cat.CATALOGUE:
        base = metric.exported(namespace)
        if metric.kind == "histogram":
            for suffix in _SUFFIXES:
                names[base + suffix] = (metric, suffix)
        else:
            names[base] = (metric, "")
    return names


def _mask_strings(expr: str) -> str:
    return _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)


def refs(expr: str, namespace: str = cat.DEFAULT_NAMESPACE) -> list[Ref]:
    """The selectors of metrics named ``<namespace>_...`` in ``expr``."""
    known = series_names(namespace)
    masked = _mask_strings(expr)
    found: list[Ref] = []
    pattern = re.compile(rf"(?<![A-Za-z0-9_:]){re.escape(namespace)}_[A-Za-z0-9_:]*")
    for m in pattern.finditer(masked):
        end = m.end()
        matchers: dict[str, tuple[str, str]] = {}
        if masked.startswith("{", end):
            close = masked.index("}", end)
            for label, op, value in _MATCHER.findall(expr[end + 1 : close]):
                matchers[label] = (op, value)
            end = close + 1
        window = None
        if masked.startswith("[", end):
            close = masked.index("]", end)
            window = expr[end + 1 : close]
        fn = _RANGE_FUNCTION.search(masked[: m.start()])
        metric, suffix = known.get(m.group(), (None, ""))
        found.append(Ref(m.group(), metric, suffix, matchers, window, fn.group(1) if fn else None))
    return found


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring`` clauses."""
    labels: set[str] = set()
    for group in _GROUPING.findall(_mask_strings(expr)):
        labels.update(part.strip() for part in group.split(",") if part.strip())
    return labels


def catalogue_problems(expr: str, namespace: str = cat.DEFAULT_NAMESPACE) -> list[str]:
    """What is wrong with ``expr`` against the catalogue: unknown metrics or labels, counters
    outside ``rate``/``increase``, gauges inside them, grouping by labels nothing has."""
    problems: list[str] = []
    found = refs(expr, namespace)
    if not found:
        problems.append("references no sessionscope metric")
    available: set[str] = set(TARGET_LABELS)
    for ref in found:
        if ref.metric is None:
            problems.append(f"{ref.name} is not in the metric catalogue")
            continue
        available |= ref.allowed_labels
        unknown = set(ref.matchers) - ref.allowed_labels
        if unknown:
            problems.append(f"{ref.name} has no label(s) {sorted(unknown)}")
        if ref.is_counter:
            if ref.function not in ("rate", "increase", "irate") or ref.range is None:
                problems.append(f"counter {ref.name} is used outside rate()/increase()")
        elif ref.function in ("rate", "increase", "irate"):
            problems.append(f"gauge {ref.name} is used inside {ref.function}()")
    missing = grouping_labels(expr) - available
    if missing:
        problems.append(f"groups by label(s) no referenced metric has: {sorted(missing)}")
    return problems


def substitute(expr: str, job: str = ".+", rate_interval: str = "1m", range_: str = "5m") -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace("$job", job)
        .replace("$instance", ".+")
        .replace("$db", ".+")
    )


# --------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the process exited: {log.read_text()[-3000:]}")
        try:
            if http_get(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout} s: {log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a process started by a test, then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Prometheus:
    """A running Prometheus server's HTTP API."""

    url: str

    def api(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=10.0)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            raise PromQLError(f"{path} {params}: HTTP {status}: {payload.get('error', body)}")
        return payload["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, present: bool, timeout: float) -> float:
        """Poll until ``expr`` returns samples (``present``) or none; the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if bool(self.query(expr)) == present:
                return time.monotonic() - started
            time.sleep(0.25)
        state = "true" if present else "false"
        raise AssertionError(f"{expr!r} did not become {state} within {timeout} s")


@dataclass
class DemoStack:
    """The demo app and a Prometheus scraping it every second, both on loopback."""

    app_url: str
    prometheus: Prometheus


@contextmanager
def demo_and_prometheus(
    prometheus_bin: str, tmp: Path, job: str, rule_files: list[Path], demo_env: dict[str, str]
) -> Iterator[DemoStack]:
    """Start the demo app (uvicorn, ``demo_env`` added to the environment) and Prometheus
    (1 s scrapes and rule evaluations of ``rule_files``) on free ports; stop both after."""
    app_port, prom_port = free_port(), free_port()
    env = {**os.environ, "DEMO_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", **demo_env}
    app_log = tmp / "app.log"
    prom_log = tmp / "prometheus.log"
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(f) for f in rule_files],
                "scrape_configs": [
                    {
                        "job_name": job,
                        "metrics_path": "/metrics/",
                        "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}],
                    }
                ],
            }
        )
    )
    procs: list[subprocess.Popen[bytes]] = []
    with app_log.open("wb") as app_out, prom_log.open("wb") as prom_out:
        try:
            app = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "demo_app.main:app"),
                    *("--host", "127.0.0.1", "--port", str(app_port), "--no-access-log"),
                ],
                cwd=ROOT,
                env=env,
                stdout=app_out,
                stderr=subprocess.STDOUT,
            )
            procs.append(app)
            prom = subprocess.Popen(
                [
                    prometheus_bin,
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    "--storage.tsdb.retention.time=1d",
                ],
                cwd=tmp,
                stdout=prom_out,
                stderr=subprocess.STDOUT,
            )
            procs.append(prom)
            app_url = f"http://127.0.0.1:{app_port}"
            prom_url = f"http://127.0.0.1:{prom_port}"
            wait_until_up(f"{app_url}/healthz", app, app_log, timeout=30)
            wait_until_up(f"{prom_url}/-/ready", prom, prom_log, timeout=30)
            yield DemoStack(app_url, Prometheus(prom_url))
        finally:
            for proc in reversed(procs):
                stop(proc)


class PromQLError(AssertionError):
    """Prometheus refused a query."""


def iter_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of the dashboard."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target
