"""Generate the Grafana dashboard and the Prometheus rules from sessionscope's metric catalogue.

    python dashboards/generate.py            # rewrite the generated files
    python dashboards/generate.py --check    # exit 1 if a generated file is out of date

Writes ``grafana/sessionscope.json`` (the "Session leaks & pool health" dashboard),
``prometheus/alerts.yml`` (recording and alert rules) and ``prometheus/alerts_test.yml``
(``promtool test rules`` cases: each alert fires on a bad series and stays silent on a healthy
one). Every metric name, unit and help text comes from ``sessionscope.catalogue``, the table the
library creates its metrics from. The dashboard is built with Grafana's own typed builders
(``grafana-foundation-sdk``, which also lays the panels out in rows); the rule files are written
with PyYAML's safe dumper. Both are in the ``dev`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

try:
    import yaml
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    with warnings.catch_warnings():
        # The SDK prefers its v2 dashboard schema, which only Grafana 12's new API takes; file
        # provisioning (and the Grafana of compose.yaml) reads the classic JSON model built here.
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.builders import (
            common,
            gauge,
            heatmap,
            prometheus,
            stat,
            table,
            timeseries,
        )
        from grafana_foundation_sdk.builders import dashboard as dashboard_
        from grafana_foundation_sdk.models import common as cm
        from grafana_foundation_sdk.models import dashboard as dm
        from grafana_foundation_sdk.models import heatmap as hm
        from grafana_foundation_sdk.models import prometheus as pm
except ModuleNotFoundError as exc:  # run outside the venv that `make install` builds
    raise SystemExit(
        f"dashboards/generate.py needs {exc.name}: install the dev extra "
        "(make install, or pip install -e '.[dev]')"
    ) from exc

from sessionscope import catalogue as cat

HERE: Final = Path(__file__).resolve().parent
DASHBOARD_FILE: Final = HERE / "grafana" / "sessionscope.json"
ALERTS_FILE: Final = HERE / "prometheus" / "alerts.yml"
ALERTS_TEST_FILE: Final = HERE / "prometheus" / "alerts_test.yml"

RUNBOOK_BASE: Final = "docs/alerts.md"
"""Each alert's ``runbook_url`` is its section of the runbook, as a path in the repository
(the project has no published docs site). ``--runbook-base`` points it at your own copy."""
DASHBOARD_UID: Final = "sessionscope-health"
RATE: Final = "$__rate_interval"
DASHBOARD_SELECTOR: Final = 'job=~"$job", instance=~"$instance", db=~"$db"'


# ------------------------------------------------------------------------------------ PromQL


@dataclass(frozen=True)
class Q:
    """PromQL builders for one namespace and one base selector (the dashboard's or none)."""

    namespace: str = cat.DEFAULT_NAMESPACE
    selector: str = ""

    def name(self, metric: cat.Metric, suffix: str = "") -> str:
        return metric.exported(self.namespace) + suffix

    def v(self, metric: cat.Metric, suffix: str = "", match: str = "") -> str:
        """An instant vector selector: ``name{selector, match}``."""
        labels = ", ".join(p for p in (self.selector, match) if p)
        return f"{self.name(metric, suffix)}{{{labels}}}" if labels else self.name(metric, suffix)

    def rate(self, metric: cat.Metric, suffix: str = "", match: str = "", w: str = RATE) -> str:
        return f"rate({self.v(metric, suffix, match)}[{w}])"

    def increase(self, metric: cat.Metric, suffix: str = "", match: str = "", w: str = RATE) -> str:
        return f"increase({self.v(metric, suffix, match)}[{w}])"

    def quantile(self, q: float, metric: cat.Metric, by: str = "", w: str = RATE) -> str:
        labels = ", ".join(p for p in (by, "le") if p)
        return f"histogram_quantile({q}, sum by ({labels}) ({self.rate(metric, '_bucket', w=w)}))"


# --------------------------------------------------------------------------------- dashboard


@dataclass
class Target:
    expr: str
    legend: str
    instant: bool = False
    heatmap: bool = False


@dataclass
class Panel:
    title: str
    kind: str
    """stat, gauge, timeseries, bars, heatmap, table."""
    targets: list[Target]
    unit: str
    description: str
    width: int = 12
    height: int = 8
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),)
    stacked: bool = False
    dashed: Sequence[str] = ()
    """Legends of series drawn as dashed lines (limits, thresholds)."""
    right_axis: dict[str, str] = field(default_factory=dict)
    """Legend -> unit of series on a right-hand axis."""
    limits: tuple[float, float] | None = None
    """(min, max) of the axis or gauge."""


@dataclass
class Row:
    title: str
    panels: list[Panel]


def dashboard_rows(ns: str = cat.DEFAULT_NAMESPACE) -> list[Row]:
    """The panels of observability.md §B.1 over the catalogue's metrics."""
    q = Q(ns, DASHBOARD_SELECTOR)
    used = 'state="used"'
    red_above_zero = ((None, "green"), (1, "red"))
    return [
        Row(
            "Overview",
            [
                Panel(
                    "Open sessions",
                    "stat",
                    [Target(f"sum({q.v(cat.SESSIONS_OPEN)})", "open")],
                    cat.SESSIONS_OPEN.unit,
                    "Request sessions open right now. It follows traffic; a value that stays up "
                    "when traffic drops means sessions are not being closed: see the Leaks row.",
                    width=4,
                    height=4,
                ),
                Panel(
                    "Pool utilization",
                    "gauge",
                    [
                        Target(
                            f"sum({q.v(cat.POOL_CONNECTIONS, match=used)}) / "
                            f"sum({q.v(cat.POOL_CONNECTIONS_MAX)})",
                            "used / max",
                        )
                    ],
                    "percentunit",
                    "Checked-out connections as a share of pool_size + max_overflow. Above 90% "
                    "new requests start waiting for a connection, then time out (503): find the "
                    "routes holding connections (Sessions row) or raise the pool size within "
                    "what the database allows.",
                    width=4,
                    height=4,
                    thresholds=((None, "green"), (0.7, "orange"), (0.9, "red")),
                    limits=(0, 1),
                ),
                Panel(
                    "Waiting for a connection",
                    "stat",
                    [Target(f"sum({q.v(cat.POOL_PENDING)})", "pending")],
                    cat.POOL_PENDING.unit,
                    "Checkouts queued for a pooled connection now. Anything above 0 for more "
                    "than a moment means the pool is exhausted: requests are slowed by the wait "
                    "and fail after pool_timeout.",
                    width=4,
                    height=4,
                    thresholds=red_above_zero,
                ),
                Panel(
                    "Checkout timeouts in range",
                    "stat",
                    [
                        Target(
                            f"sum({q.increase(cat.POOL_TIMEOUTS, w='$__range')})",
                            "timeouts",
                            instant=True,
                        )
                    ],
                    "short",
                    "Checkouts that gave up after pool_timeout during the selected time range; "
                    "each one answered 503. Any non-zero value is an outage for those users: "
                    "look at Pool utilization and the sessions held by route.",
                    width=4,
                    height=4,
                    thresholds=red_above_zero,
                ),
                Panel(
                    "Sessions over leak threshold",
                    "stat",
                    [Target(f"sum({q.v(cat.SESSIONS_LEAK_SUSPECTED)})", "suspected")],
                    cat.SESSIONS_LEAK_SUSPECTED.unit,
                    "Open request sessions older than the leak threshold. Above 0 a request is "
                    "holding its session (and usually a connection) far longer than expected: "
                    "the db_session.leak_suspected log event carries the route and the stack "
                    "of whatever holds it.",
                    width=4,
                    height=4,
                    thresholds=red_above_zero,
                ),
                Panel(
                    "Oldest open session",
                    "stat",
                    [Target(f"max({q.v(cat.SESSION_OLDEST_AGE)})", "oldest")],
                    cat.SESSION_OLDEST_AGE.unit,
                    "Age of the oldest open request session. It should stay near your slowest "
                    "request; a value that keeps growing is a session that is never closed.",
                    width=4,
                    height=4,
                    thresholds=((None, "green"), (30, "orange"), (60, "red")),
                ),
            ],
        ),
        Row(
            "Pool",
            [
                Panel(
                    "Connections by state vs max",
                    "timeseries",
                    [
                        Target(
                            f"sum by (db, state) ({q.v(cat.POOL_CONNECTIONS)})", "{{db}} {{state}}"
                        ),
                        Target(f"sum by (db) ({q.v(cat.POOL_CONNECTIONS_MAX)})", "{{db}} max"),
                    ],
                    cat.POOL_CONNECTIONS.unit,
                    "Idle and used pooled connections, stacked, against the most the pool may "
                    "open (dashed). Used reaching max means exhaustion; used that stays high "
                    "while traffic is low means connections are held without work.",
                    stacked=True,
                    dashed=("{{db}} max",),
                ),
                Panel(
                    "Pending checkouts",
                    "timeseries",
                    [Target(f"sum by (db) ({q.v(cat.POOL_PENDING)})", "{{db}}")],
                    cat.POOL_PENDING.unit,
                    "Checkouts waiting for a connection. Sustained values above 0 mean the pool "
                    "is too small for the traffic or connections are held too long; requests "
                    "waiting longer than pool_timeout fail with 503.",
                ),
                Panel(
                    "Connection wait p50 / p95 / p99",
                    "timeseries",
                    [
                        *(
                            Target(q.quantile(p, cat.POOL_WAIT, by="db"), f"{{{{db}}}} p{n}")
                            for p, n in ((0.5, 50), (0.95, 95), (0.99, 99))
                        ),
                        Target(f"max by (db) ({q.v(cat.POOL_TIMEOUT)})", "{{db}} pool_timeout"),
                    ],
                    cat.POOL_WAIT.unit,
                    "Time a checkout waits for a connection (pre-ping and new connections "
                    "included) against the pool's timeout (dashed). It should be milliseconds; "
                    "p99 approaching pool_timeout is imminent 503s.",
                    dashed=("{{db}} pool_timeout",),
                ),
                Panel(
                    "Connection wait distribution",
                    "heatmap",
                    [
                        Target(
                            f"sum by (le) ({q.increase(cat.POOL_WAIT, '_bucket')})",
                            "{{le}}",
                            heatmap=True,
                        )
                    ],
                    cat.POOL_WAIT.unit,
                    "Checkouts per wait-time bucket. A second band far above the main one is a "
                    "minority of requests stuck behind an exhausted pool.",
                ),
                Panel(
                    "Connection use time p99 and mean",
                    "timeseries",
                    [
                        Target(q.quantile(0.99, cat.POOL_USE, by="db"), "{{db}} p99"),
                        Target(
                            f"sum by (db) ({q.rate(cat.POOL_USE, '_sum')}) / "
                            f"sum by (db) ({q.rate(cat.POOL_USE, '_count')})",
                            "{{db}} mean",
                        ),
                    ],
                    cat.POOL_USE.unit,
                    "How long a connection stays checked out. Long use times hold the pool for "
                    "everyone: look for slow queries, external calls made inside a transaction, "
                    "or routes sleeping while holding their session.",
                ),
                Panel(
                    "Checkout timeouts",
                    "bars",
                    [Target(f"sum by (db) ({q.rate(cat.POOL_TIMEOUTS)})", "{{db}}")],
                    "ops",
                    "Checkouts per second that failed after pool_timeout (each became a 503). "
                    "Should be 0; otherwise the pool is exhausted: see Pool utilization and "
                    "Sessions held concurrently by route.",
                    thresholds=red_above_zero,
                ),
                Panel(
                    "Connection churn",
                    "timeseries",
                    [
                        Target(f"sum by (db) ({q.rate(cat.POOL_CREATED)})", "{{db}} opened"),
                        Target(f"sum by (db) ({q.rate(cat.POOL_CLOSED)})", "{{db}} closed"),
                        Target(
                            f"sum by (db, kind) ({q.rate(cat.POOL_INVALIDATED)})",
                            "{{db}} invalidated {{kind}}",
                        ),
                    ],
                    "ops",
                    "Connections opened, closed and invalidated per second. A healthy pool "
                    "reuses connections: steady opening means max_overflow churn or pool_recycle "
                    "too short; invalidations mean the database or network drops connections.",
                ),
                Panel(
                    "New-connection time p95",
                    "timeseries",
                    [Target(q.quantile(0.95, cat.POOL_CONNECT, by="db"), "{{db}} p95")],
                    cat.POOL_CONNECT.unit,
                    "Time to open a database connection (TLS and authentication included). "
                    "High values make every pool miss slow; a rising trend often precedes "
                    "database overload.",
                ),
            ],
        ),
        Row(
            "Sessions",
            [
                Panel(
                    "Sessions closed by outcome",
                    "timeseries",
                    [Target(f"sum by (outcome) ({q.rate(cat.SESSIONS_CLOSED)})", "{{outcome}}")],
                    "ops",
                    "Request sessions closed per second: committed, rolled back, or unused "
                    "(created but never queried). A growing rollback share means more failing "
                    "requests: see Rollbacks by reason.",
                    stacked=True,
                ),
                Panel(
                    "Session duration p50 / p95 / p99",
                    "timeseries",
                    [
                        Target(q.quantile(p, cat.SESSION_DURATION), f"p{n}")
                        for p, n in ((0.5, 50), (0.95, 95), (0.99, 99))
                    ],
                    cat.SESSION_DURATION.unit,
                    "Time from a request session's creation to its close. A long tail holds "
                    "connections and precedes pool exhaustion; compare it with the leak "
                    "threshold.",
                ),
                Panel(
                    "Session duration distribution",
                    "heatmap",
                    [
                        Target(
                            f"sum by (le) ({q.increase(cat.SESSION_DURATION, '_bucket')})",
                            "{{le}}",
                            heatmap=True,
                        )
                    ],
                    cat.SESSION_DURATION.unit,
                    "Sessions closed per duration bucket. A band in the top buckets (tens of "
                    "seconds) is slow routes or leaked sessions that were eventually closed.",
                ),
                Panel(
                    "Rollbacks by reason",
                    "timeseries",
                    [Target(f"sum by (reason) ({q.rate(cat.SESSION_ROLLBACKS)})", "{{reason}}")],
                    "ops",
                    "Rollbacks per second: status_4xx/status_5xx are the app's own answers; "
                    "exception, commit_error and cancelled are failures; pool_timeout is a 503 for "
                    "want of a connection; late_write is work done "
                    "after the response started that was never committed (lost data: commit it "
                    "in its own session_scope); disconnected: the client had left before the "
                    "response.",
                    stacked=True,
                ),
                Panel(
                    "Commit duration p99",
                    "timeseries",
                    [Target(q.quantile(0.99, cat.SESSION_COMMIT_DURATION), "p99")],
                    cat.SESSION_COMMIT_DURATION.unit,
                    "Time spent committing request transactions (final flush included); the "
                    "client waits for it before seeing the status. High values mean lock "
                    "contention, large flushes or a slow disk on the database.",
                ),
                Panel(
                    "Sessions held concurrently by route (top 10)",
                    "timeseries",
                    [Target(f"topk(10, sum by (route) ({q.rate(cat.SESSION_HELD)}))", "{{route}}")],
                    "short",
                    "Average number of sessions each route holds at once (seconds held per "
                    "second, Little's law). The routes on top occupy the pool: make them "
                    "shorter or give them their own pool.",
                ),
                Panel(
                    "Mean session duration by route",
                    "table",
                    [
                        Target(
                            f"sum by (route) ({q.rate(cat.SESSION_HELD, w='$__range')}) / "
                            f"sum by (route) ({q.rate(cat.SESSIONS_CLOSED, w='$__range')})",
                            "{{route}}",
                            instant=True,
                        )
                    ],
                    cat.SESSION_DURATION.unit,
                    "Mean time a session was held per route over the selected range, longest "
                    "first. Routes at the top are where to look for slow queries or work done "
                    "while holding the session.",
                ),
                Panel(
                    "Session errors",
                    "timeseries",
                    [
                        Target(
                            f"sum by (phase, error_type) ({q.rate(cat.SESSION_ERRORS)})",
                            "{{phase}} {{error_type}}",
                        )
                    ],
                    "ops",
                    "Errors raised by commit, rollback or close. Commit errors answered 500 "
                    "(constraint violations, serialization failures); rollback/close errors may "
                    "leave a connection idle in transaction: check the database.",
                    thresholds=red_above_zero,
                ),
            ],
        ),
        Row(
            "Leaks",
            [
                Panel(
                    "Oldest open session vs leak threshold",
                    "timeseries",
                    [
                        Target(f"max by (db) ({q.v(cat.SESSION_OLDEST_AGE)})", "{{db}} oldest"),
                        Target(f"max by (db) ({q.v(cat.LEAK_THRESHOLD)})", "{{db}} threshold"),
                    ],
                    "s",
                    "Age of the oldest open session against the leak threshold (dashed). "
                    "Crossing it reports a suspected leak; a line that keeps climbing is a "
                    "session nobody will close.",
                    dashed=("{{db}} threshold",),
                ),
                Panel(
                    "Sessions over leak threshold",
                    "timeseries",
                    [
                        Target(
                            f"sum by (instance, db) ({q.v(cat.SESSIONS_LEAK_SUSPECTED)})",
                            "{{instance}} {{db}}",
                        )
                    ],
                    cat.SESSIONS_LEAK_SUSPECTED.unit,
                    "Open sessions older than the threshold, per instance. Should be 0; the "
                    "db_session.leak_suspected log line names the route and the holder's stack.",
                    thresholds=red_above_zero,
                ),
                Panel(
                    "Leaks detected vs resolved by route",
                    "bars",
                    [
                        Target(
                            f"sum by (route) ({q.increase(cat.SESSION_LEAKS_DETECTED)})",
                            "{{route}} detected",
                        ),
                        Target(
                            f"sum by (route) ({q.increase(cat.SESSION_LEAKS_RESOLVED)})",
                            "{{route}} resolved",
                        ),
                    ],
                    "short",
                    "Sessions that crossed the leak threshold, and those closed later. Detected "
                    "and resolved together are slow requests (raise the threshold or exempt the "
                    "route); detected without resolved are real leaks.",
                ),
                Panel(
                    "Use after close and unclosed sessions",
                    "bars",
                    [
                        Target(
                            f"sum by (route) ({q.increase(cat.SESSION_USE_AFTER_CLOSE)})",
                            "{{route}} used after close",
                        ),
                        Target(
                            f"sum({q.increase(cat.SESSIONS_GC_UNCLOSED)})",
                            "session_scope garbage-collected unclosed",
                        ),
                    ],
                    "short",
                    "Request sessions used after their request finished (a task that outlives "
                    "the request; it must open its own session_scope) and session_scope() "
                    "sessions never closed. Both should be 0: they are bugs in the app.",
                ),
                Panel(
                    "Used connections vs traffic (leak signature)",
                    "timeseries",
                    [
                        Target(f"sum({q.v(cat.POOL_CONNECTIONS, match=used)})", "used connections"),
                        Target(f"sum({q.rate(cat.SESSIONS_CLOSED)})", "sessions closed/s"),
                    ],
                    "short",
                    "Connections checked out (left axis) against sessions closed per second "
                    "(right axis). Used connections that stay up while traffic falls to zero are "
                    "the classic leak signature.",
                    width=24,
                    right_axis={"sessions closed/s": "ops"},
                ),
            ],
        ),
        Row(
            "Statements",
            [
                Panel(
                    "Statements per request p50 / p95 / p99",
                    "timeseries",
                    [
                        Target(q.quantile(p, cat.SESSION_STATEMENTS), f"p{n}")
                        for p, n in ((0.5, 50), (0.95, 95), (0.99, 99))
                    ],
                    cat.SESSION_STATEMENTS.unit,
                    "SQL statements run per request session. Tens or hundreds per request is "
                    "usually an N+1 query pattern (lazy loading in a loop): use selectinload or "
                    "joinedload.",
                ),
                Panel(
                    "Average statements per request by route (top 10)",
                    "bars",
                    [
                        Target(
                            f"topk(10, sum by (route) ({q.rate(cat.STATEMENTS)}) / "
                            f"sum by (route) ({q.rate(cat.SESSIONS_CLOSED)}))",
                            "{{route}}",
                        )
                    ],
                    "short",
                    "Mean statements per request for the heaviest routes. A route whose count "
                    "grows with the data it returns has an N+1: load the relationship eagerly.",
                ),
            ],
        ),
    ]


def _datasource() -> dm.DataSourceRef:
    return dm.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _query(panel: Panel, target: Target, ref_id: str) -> prometheus.Dataquery:
    query = (
        prometheus.Dataquery()
        .datasource(_datasource())
        .expr(target.expr)
        .legend_format(target.legend)
        .ref_id(ref_id)
    )
    if target.instant or panel.kind == "table":
        query = query.instant()
    elif panel.kind in ("stat", "gauge"):
        query = query.range()
    if target.heatmap:
        query = query.format(pm.PromQueryFormat.HEATMAP)
    if panel.kind == "table":
        query = query.format(pm.PromQueryFormat.TABLE)
    return query


PanelBuilder = timeseries.Panel | stat.Panel | gauge.Panel | heatmap.Panel | table.Panel


def _timeseries(panel: Panel) -> timeseries.Panel:
    bars = panel.kind == "bars"
    built = (
        timeseries.Panel()
        .draw_style(cm.GraphDrawStyle.BARS if bars else cm.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(60 if bars else (30 if panel.stacked else 10))
        .show_points(cm.VisibilityMode.NEVER)
        .stacking(
            common.StackingConfig()
            .mode(cm.StackingMode.NORMAL if panel.stacked else cm.StackingMode.NONE)
            .group("A")
        )
        .axis_soft_min(0)
        .legend(
            common.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common.VizTooltipOptions()
            .mode(cm.TooltipDisplayMode.MULTI)
            .sort(cm.SortOrder.DESCENDING)
        )
    )
    for legend in panel.dashed:  # limits and thresholds: dashed red lines, never stacked
        built = built.override_by_name(
            legend,
            [
                dm.DynamicConfigValue("custom.lineStyle", cm.LineStyle(fill="dash", dash=[10, 10])),
                dm.DynamicConfigValue("custom.fillOpacity", 0),
                dm.DynamicConfigValue(
                    "custom.stacking", cm.StackingConfig(mode=cm.StackingMode.NONE, group="A")
                ),
                dm.DynamicConfigValue(
                    "color", dm.FieldColor(mode=dm.FieldColorModeId.FIXED, fixed_color="red")
                ),
            ],
        )
    for legend, unit in panel.right_axis.items():
        built = built.override_by_name(
            legend,
            [
                dm.DynamicConfigValue("custom.axisPlacement", cm.AxisPlacement.RIGHT),
                dm.DynamicConfigValue("unit", unit),
            ],
        )
    return built


def _stat(panel: Panel) -> stat.Panel:
    return (
        stat.Panel()
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .text_mode(cm.BigValueTextMode.VALUE)
    )


def _gauge(panel: Panel) -> gauge.Panel:
    built = gauge.Panel().reduce_options(
        common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
    )
    if panel.limits is not None:
        built = built.min(panel.limits[0]).max(panel.limits[1])
    return built


def _heatmap(panel: Panel) -> heatmap.Panel:
    return (
        heatmap.Panel()
        .calculate(False)
        .cell_gap(1)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .steps(64)
        )
        .y_axis(heatmap.YAxisConfig().unit(panel.unit))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.AUTO))
        .tooltip(heatmap.HeatmapTooltip().mode(cm.TooltipDisplayMode.SINGLE).y_histogram(True))
    )


def _table(panel: Panel) -> table.Panel:
    return (
        table.Panel()
        .show_header(True)
        .sort_by([common.TableSortByFieldState().display_name("Value").desc(True)])
        .override_by_name("Time", [dm.DynamicConfigValue("custom.hidden", True)])
    )


KINDS: Final[dict[str, Callable[[Panel], PanelBuilder]]] = {
    "timeseries": _timeseries,
    "bars": _timeseries,
    "stat": _stat,
    "gauge": _gauge,
    "heatmap": _heatmap,
    "table": _table,
}


def _panel(panel: Panel, pid: int) -> PanelBuilder:
    """The SDK builder of ``panel``: its visualisation, then what every panel has."""
    built = KINDS[panel.kind](panel)
    for i, target in enumerate(panel.targets):
        built = built.with_target(_query(panel, target, chr(ord("A") + i)))
    color = "thresholds" if panel.kind in ("stat", "gauge") else "palette-classic"
    return (
        built.id(pid)
        .title(panel.title)
        .description(panel.description)
        .datasource(_datasource())
        .span(panel.width)
        .height(panel.height)
        .unit(panel.unit)
        .thresholds(
            dashboard_.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=v, color=c) for v, c in panel.thresholds])
        )
        .color_scheme(dashboard_.FieldColor().mode(dm.FieldColorModeId(color)))
    )


def _variable(name: str, label: str, query: str) -> dashboard_.QueryVariable:
    return (
        dashboard_.QueryVariable(name)
        .label(label)
        .datasource(_datasource())
        .query({"query": query, "refId": f"{name}-variable"})
        .definition(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".+")
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


def dashboard_builder(ns: str = cat.DEFAULT_NAMESPACE) -> dashboard_.Dashboard:
    """The dashboard, built with grafana-foundation-sdk (which lays the panels out in rows)."""
    anchor = cat.SESSIONS_OPEN.exported(ns)
    built = (
        dashboard_.Dashboard("Session leaks & pool health")
        .uid(DASHBOARD_UID)
        .description(
            "sessionscope: request sessions, leaks, the connection pool and statements per "
            "request. Every panel's description says what a bad value means."
        )
        .tags(["sessionscope", "sqlalchemy", "database"])
        .readonly()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .version(1)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(
            dashboard_.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(_variable("job", "Job", f"label_values({anchor}, job)"))
        .with_variable(
            _variable("instance", "Instance", f'label_values({anchor}{{job=~"$job"}}, instance)')
        )
        .with_variable(
            _variable(
                "db",
                "Database",
                f'label_values({anchor}{{job=~"$job", instance=~"$instance"}}, db)',
            )
        )
    )
    pid = 1
    for row in dashboard_rows(ns):
        built = built.with_row(dashboard_.Row(row.title).id(pid))
        pid += 1
        for panel in row.panels:
            built = built.with_panel(_panel(panel, pid))
            pid += 1
    return built


def dashboard(ns: str = cat.DEFAULT_NAMESPACE) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (what ``grafana/sessionscope.json`` holds)."""
    model: dict[str, Any] = json.loads(JSONEncoder().encode(dashboard_builder(ns).build()))
    return {"__comment": HEADER.lstrip("# ").rstrip(), **model}


# ------------------------------------------------------------------------------------ alerts


@dataclass(frozen=True)
class Case:
    """A ``promtool test rules`` case for one alert: input series and what must fire."""

    series: dict[str, str]
    """Series (without namespace prefix on the metric: ``{ns}`` is replaced) -> values."""
    eval_time: str
    fires: Sequence[tuple[dict[str, str], str]] = ()
    """(extra labels, rendered summary) of each alert expected; empty: must stay silent."""
    also: Sequence[tuple[str, bool]] = ()
    """More (eval_time, fires) checks on the same series: at each, the alerts of ``fires``
    are firing (``True``) or nothing is (``False``: not firing yet, or resolved)."""


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    labels: tuple[str, ...]
    """The alert's grouping labels (those its expression keeps)."""
    bad: Case
    healthy: Case
    lifecycle: Case | None = None
    """A case that checks the alert at several times: pending (not firing yet), firing and
    resolved."""

    @property
    def anchor(self) -> str:
        return self.name.lower()


TEST_LABELS: Final = {"job": "demo", "instance": "app:8000", "db": "default"}


def _s(metric: cat.Metric, ns: str, suffix: str = "", **labels: str) -> str:
    """A test series name with the standard test labels and ``labels``."""
    all_labels = {**TEST_LABELS, **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
    return f"{metric.exported(ns)}{suffix}{{{inner}}}"


def recording_rules(ns: str = cat.DEFAULT_NAMESPACE) -> list[tuple[str, str]]:
    """(record, expr): the ratios and rates worth keeping precomputed."""
    q = Q(ns)
    jid = "job, instance, db"
    used = 'state="used"'
    return [
        (
            f"job_instance_db:{q.name(cat.POOL_CONNECTIONS)}_used_per_max:ratio",
            f"sum by ({jid}) ({q.v(cat.POOL_CONNECTIONS, match=used)}) / "
            f"sum by ({jid}) ({q.v(cat.POOL_CONNECTIONS_MAX)})",
        ),
        (
            f"job_db_le:{q.name(cat.POOL_WAIT)}_bucket:rate5m",
            f"sum by (job, db, le) ({q.rate(cat.POOL_WAIT, '_bucket', w='5m')})",
        ),
        (
            f"job_db_route:{q.name(cat.STATEMENTS)}_per_session:ratio_rate30m",
            f"sum by (job, db, route) ({q.rate(cat.STATEMENTS, w='30m')}) / "
            f"sum by (job, db, route) ({q.rate(cat.SESSIONS_CLOSED, w='30m')})",
        ),
    ]


def alerts(ns: str = cat.DEFAULT_NAMESPACE) -> list[Alert]:
    """The alert rules (observability.md §B.3), each with a bad and a healthy test case."""
    q = Q(ns)
    jid = "job, instance, db"
    used = 'state="used"'
    commit_phase = 'phase="commit"'
    cleanup_phase = 'phase=~"rollback|close"'
    error_reasons = 'reason=~"exception|commit_error|cancelled"'
    late = 'reason="late_write"'

    def s(metric: cat.Metric, suffix: str = "", **labels: str) -> str:
        return _s(metric, ns, suffix, **labels)

    where = "on {{ $labels.instance }} (db {{ $labels.db }})"
    at = "on app:8000 (db default)"
    return [
        Alert(
            "DbSessionLeakSuspected",
            f"sum by ({jid}) ({q.v(cat.SESSIONS_LEAK_SUSPECTED)}) > 0",
            "5m",
            "warning",
            f"{{{{ $value }}}} request session(s) open longer than the leak threshold {where}",
            "Request sessions have been open longer than the leak threshold for 5 minutes. "
            "Each holds a session and usually a pooled connection; enough of them exhaust the "
            "pool.",
            ("job", "instance", "db"),
            Case(
                {s(cat.SESSIONS_LEAK_SUSPECTED): "0 0 2x20"},
                "10m",
                [({}, f"2 request session(s) open longer than the leak threshold {at}")],
            ),
            Case({s(cat.SESSIONS_LEAK_SUSPECTED): "0 0 2 2 0x20"}, "10m"),
            # Over the threshold from 2m to 10m: pending until 7m, firing 7m-10m, resolved at 11m.
            lifecycle=Case(
                {s(cat.SESSIONS_LEAK_SUSPECTED): "0 0 2x8 0x10"},
                "7m",
                [({}, f"2 request session(s) open longer than the leak threshold {at}")],
                also=(("6m", False), ("10m", True), ("12m", False)),
            ),
        ),
        Alert(
            "DbSessionVeryOld",
            f"max by ({jid}) ({q.v(cat.SESSION_OLDEST_AGE)}) > 2 * "
            f"max by ({jid}) ({q.v(cat.LEAK_THRESHOLD)} > 0)",
            "2m",
            "critical",
            f"Oldest open request session {where} is {{{{ $value | humanizeDuration }}}} old",
            "The oldest open request session is more than twice the leak threshold old: a "
            "request is stuck or its session is never closed.",
            ("job", "instance", "db"),
            Case(
                {s(cat.SESSION_OLDEST_AGE): "600x10", s(cat.LEAK_THRESHOLD): "60x10"},
                "5m",
                [({}, f"Oldest open request session {at} is 10m 0s old")],
            ),
            Case({s(cat.SESSION_OLDEST_AGE): "90x10", s(cat.LEAK_THRESHOLD): "60x10"}, "5m"),
        ),
        Alert(
            "DbConnectionsHeldWithoutTraffic",
            f"sum by ({jid}) ({q.v(cat.POOL_CONNECTIONS, match=used)}) > 0 "
            f"unless on ({jid}) sum by ({jid}) ({q.rate(cat.SESSIONS_CLOSED, w='10m')}) > 0",
            "15m",
            "warning",
            f"{{{{ $value }}}} connection(s) checked out {where} while no request session "
            "closed for 10 minutes",
            "Pooled connections stay checked out although no request session has closed for "
            "10 minutes: the classic leak signature (or a legitimately long job).",
            ("job", "instance", "db"),
            Case(
                {
                    s(cat.POOL_CONNECTIONS, state="used"): "3x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="commit"): "0+10x5 50x35",
                },
                "35m",
                [
                    (
                        {},
                        f"3 connection(s) checked out {at} "
                        "while no request session closed for 10 minutes",
                    )
                ],
            ),
            Case(
                {
                    s(cat.POOL_CONNECTIONS, state="used"): "3x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="commit"): "0+10x40",
                },
                "35m",
            ),
        ),
        Alert(
            "DbPoolNearExhaustion",
            f"sum by ({jid}) ({q.v(cat.POOL_CONNECTIONS, match=used)}) / "
            f"sum by ({jid}) ({q.v(cat.POOL_CONNECTIONS_MAX)}) > 0.9",
            "5m",
            "warning",
            f"Connection pool {where} is {{{{ $value | humanizePercentage }}}} used",
            "More than 90% of the pool's connections (pool_size + max_overflow) are checked "
            "out; new requests will wait for a connection and then fail with 503.",
            ("job", "instance", "db"),
            Case(
                {
                    s(cat.POOL_CONNECTIONS, state="used"): "10x20",
                    s(cat.POOL_CONNECTIONS_MAX): "10x20",
                },
                "10m",
                [({}, f"Connection pool {at} is 100% used")],
            ),
            Case(
                {
                    s(cat.POOL_CONNECTIONS, state="used"): "5x20",
                    s(cat.POOL_CONNECTIONS_MAX): "10x20",
                },
                "10m",
            ),
        ),
        Alert(
            "DbPoolPendingRequests",
            f"sum by ({jid}) ({q.v(cat.POOL_PENDING)}) > 0",
            "5m",
            "warning",
            f"{{{{ $value }}}} checkout(s) waiting for a pooled connection {where}",
            "Requests have been queueing for a pooled connection for 5 minutes: the earliest "
            "sign of pool exhaustion.",
            ("job", "instance", "db"),
            Case(
                {s(cat.POOL_PENDING): "4x20"},
                "10m",
                [({}, f"4 checkout(s) waiting for a pooled connection {at}")],
            ),
            Case({s(cat.POOL_PENDING): "0 4 0 0x20"}, "10m"),
        ),
        Alert(
            "DbPoolCheckoutTimeouts",
            f"sum by ({jid}) ({q.increase(cat.POOL_TIMEOUTS, w='5m')}) > 0",
            "0m",
            "critical",
            f"Checkouts timed out waiting for a pooled connection {where}",
            "Checkouts gave up after pool_timeout: those requests were answered 503. The pool "
            "is exhausted.",
            ("job", "instance", "db"),
            Case(
                {s(cat.POOL_TIMEOUTS): "0x5 1+1x10"},
                "10m",
                [({}, f"Checkouts timed out waiting for a pooled connection {at}")],
            ),
            Case({s(cat.POOL_TIMEOUTS): "0x20"}, "10m"),
        ),
        Alert(
            "DbCommitErrors",
            f"sum by ({jid}, error_type) "
            f"({q.increase(cat.SESSION_ERRORS, match=commit_phase, w='5m')}) > 0",
            "0m",
            "warning",
            f"Request commits failed with {{{{ $labels.error_type }}}} {where}",
            "Commits of request transactions failed; the clients got 500 and the writes were "
            "rolled back.",
            ("job", "instance", "db", "error_type"),
            Case(
                {s(cat.SESSION_ERRORS, phase="commit", error_type="IntegrityError"): "0x5 1+1x10"},
                "10m",
                [
                    (
                        {"error_type": "IntegrityError"},
                        f"Request commits failed with IntegrityError {at}",
                    )
                ],
            ),
            Case(
                {s(cat.SESSION_ERRORS, phase="commit", error_type="IntegrityError"): "0x20"}, "10m"
            ),
        ),
        Alert(
            "DbSessionCleanupFailed",
            f"sum by ({jid}, phase, error_type) "
            f"({q.increase(cat.SESSION_ERRORS, match=cleanup_phase, w='10m')}) > 0",
            "0m",
            "warning",
            f"Request session {{{{ $labels.phase }}}} failed with {{{{ $labels.error_type }}}} "
            f"{where}",
            "Rolling back or closing a request session failed; its connection was invalidated, "
            "but the database may still hold the transaction (idle in transaction).",
            ("job", "instance", "db", "phase", "error_type"),
            Case(
                {s(cat.SESSION_ERRORS, phase="close", error_type="OperationalError"): "0x5 1x10"},
                "8m",
                [
                    (
                        {"phase": "close", "error_type": "OperationalError"},
                        f"Request session close failed with OperationalError {at}",
                    )
                ],
            ),
            Case(
                {s(cat.SESSION_ERRORS, phase="close", error_type="OperationalError"): "0x20"}, "10m"
            ),
        ),
        Alert(
            "DbRollbackRatioHigh",
            f"sum by ({jid}) ({q.rate(cat.SESSION_ROLLBACKS, match=error_reasons, w='10m')}) / "
            f"sum by ({jid}) ({q.rate(cat.SESSIONS_CLOSED, w='10m')}) > 0.05",
            "15m",
            "warning",
            f"{{{{ $value | humanizePercentage }}}} of request sessions {where} rolled back "
            "on errors",
            "More than 5% of request sessions were rolled back because of an exception, a "
            "failed commit or a cancellation.",
            ("job", "instance", "db"),
            Case(
                {
                    s(cat.SESSION_ROLLBACKS, reason="exception"): "0+1x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="commit"): "0+9x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="rollback"): "0+1x40",
                },
                "30m",
                [({}, f"10% of request sessions {at} rolled back on errors")],
            ),
            Case(
                {
                    s(cat.SESSION_ROLLBACKS, reason="status_4xx"): "0+5x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="commit"): "0+5x40",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="rollback"): "0+5x40",
                },
                "30m",
            ),
        ),
        Alert(
            "DbStatementsPerRequestHigh",
            f"sum by (job, db, route) ({q.rate(cat.STATEMENTS, w='30m')}) / "
            f"sum by (job, db, route) ({q.rate(cat.SESSIONS_CLOSED, w='30m')}) > 50",
            "30m",
            "info",
            "Route {{ $labels.route }} (db {{ $labels.db }}) runs {{ $value | humanize }} "
            "statements per request",
            "A route averages more than 50 SQL statements per request: usually an N+1 query "
            "pattern (lazy loading in a loop).",
            ("job", "db", "route"),
            Case(
                {
                    s(cat.STATEMENTS, route="/items-with-notes"): "0+200x100",
                    s(cat.SESSIONS_CLOSED, route="/items-with-notes", outcome="commit"): "0+2x100",
                },
                "90m",
                [
                    (
                        {"route": "/items-with-notes"},
                        "Route /items-with-notes (db default) runs 100 statements per request",
                    )
                ],
            ),
            Case(
                {
                    s(cat.STATEMENTS, route="/items"): "0+6x100",
                    s(cat.SESSIONS_CLOSED, route="/items", outcome="commit"): "0+2x100",
                },
                "90m",
            ),
        ),
        Alert(
            "DbSessionLateWrites",
            f"sum by ({jid}) ({q.increase(cat.SESSION_ROLLBACKS, match=late, w='15m')}) > 0",
            "0m",
            "warning",
            f"Writes made after the response started were rolled back {where}",
            "The application wrote through the request session after its response started "
            "(background task, streaming body) without committing: those writes were lost.",
            ("job", "instance", "db"),
            Case(
                {s(cat.SESSION_ROLLBACKS, reason="late_write"): "0x5 1x10"},
                "10m",
                [({}, f"Writes made after the response started were rolled back {at}")],
            ),
            Case({s(cat.SESSION_ROLLBACKS, reason="late_write"): "0x20"}, "10m"),
        ),
        Alert(
            "DbSessionUseAfterClose",
            f"sum by (job, db, route) ({q.increase(cat.SESSION_USE_AFTER_CLOSE, w='15m')}) > 0",
            "0m",
            "warning",
            "Route {{ $labels.route }} (db {{ $labels.db }}) used its request session after "
            "the request finished",
            "Code started by a request used the request's session after the request ended; it "
            "got SessionClosedError. Work that outlives a request needs its own session_scope.",
            ("job", "db", "route"),
            Case(
                {s(cat.SESSION_USE_AFTER_CLOSE, route="/fire-and-forget"): "0x5 1x10"},
                "10m",
                [
                    (
                        {"route": "/fire-and-forget"},
                        "Route /fire-and-forget (db default) "
                        "used its request session after the request finished",
                    )
                ],
            ),
            Case({s(cat.SESSION_USE_AFTER_CLOSE, route="/fire-and-forget"): "0x20"}, "10m"),
        ),
        Alert(
            "DbSessionGarbageCollectedUnclosed",
            f"sum by (job, db) ({q.increase(cat.SESSIONS_GC_UNCLOSED, w='15m')}) > 0",
            "0m",
            "warning",
            "session_scope() sessions of db {{ $labels.db }} were garbage-collected unclosed",
            "Sessions created by session_scope() were garbage-collected without being closed "
            "(the context manager was not used as one); their connections went back to the "
            "pool only by chance.",
            ("job", "db"),
            Case(
                {s(cat.SESSIONS_GC_UNCLOSED): "0x5 2x10"},
                "10m",
                [({}, "session_scope() sessions of db default were garbage-collected unclosed")],
            ),
            Case({s(cat.SESSIONS_GC_UNCLOSED): "0x20"}, "10m"),
        ),
    ]


def runbook_url(alert: Alert, base: str = RUNBOOK_BASE) -> str:
    return f"{base}#{alert.anchor}"


def alert_rules_document(
    ns: str = cat.DEFAULT_NAMESPACE, base: str = RUNBOOK_BASE
) -> dict[str, Any]:
    return {
        "groups": [
            {
                "name": "sessionscope.rules",
                "rules": [{"record": r, "expr": e} for r, e in recording_rules(ns)],
            },
            {
                "name": "sessionscope.alerts",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.for_,
                        "labels": {"severity": a.severity},
                        "annotations": {
                            "summary": a.summary,
                            "description": a.description,
                            "runbook_url": runbook_url(a, base),
                        },
                    }
                    for a in alerts(ns)
                ],
            },
        ]
    }


def _minutes(duration: str) -> float:
    """``"90m"`` or ``"2h"`` -> minutes (the eval_time forms the cases use)."""
    return float(duration[:-1]) * {"m": 1, "h": 60}[duration[-1]]


def alert_tests_document(
    ns: str = cat.DEFAULT_NAMESPACE, base: str = RUNBOOK_BASE
) -> dict[str, Any]:
    tests = []
    for a in alerts(ns):
        cases = [
            (f"{a.name} fires on a bad series", a.bad),
            (f"{a.name} stays silent on a healthy series", a.healthy),
        ]
        if a.lifecycle is not None:
            cases.append(
                (f"{a.name} goes pending, fires after for: {a.for_}, then resolves", a.lifecycle)
            )
        for name, case in cases:
            exp = []
            for extra, summary in case.fires:
                labels = {k: TEST_LABELS[k] for k in a.labels if k in TEST_LABELS}
                exp.append(
                    {
                        "exp_labels": {"severity": a.severity, **labels, **extra},
                        "exp_annotations": {
                            "summary": summary,
                            "description": a.description,
                            "runbook_url": runbook_url(a, base),
                        },
                    }
                )
            checks = [(case.eval_time, True), *case.also]
            tests.append(
                {
                    "name": name,
                    "interval": "1m",
                    "input_series": [{"series": k, "values": v} for k, v in case.series.items()],
                    "alert_rule_test": [
                        {"eval_time": t, "alertname": a.name, "exp_alerts": exp if fires else []}
                        for t, fires in sorted(checks, key=lambda c: _minutes(c[0]))
                    ],
                }
            )
    return {"rule_files": [ALERTS_FILE.name], "evaluation_interval": "1m", "tests": tests}


# -------------------------------------------------------------------------------------- YAML


def to_yaml(value: Any) -> str:
    """``value`` as YAML that ``yaml.safe_load`` reads back as ``value``: PyYAML quotes every
    string that would otherwise read as a boolean, a number or null (``No``, ``Off``, ``NULL``).
    Keys keep the order the generator built them in; long expressions stay on one line."""
    text: str = yaml.dump(
        value,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=1_000_000,
    )
    return text


class _Dumper(yaml.SafeDumper):
    """``yaml.safe_dump``'s dumper, writing a value used twice twice (no ``&id001`` anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


HEADER: Final = (
    "# Generated by dashboards/generate.py from sessionscope's metric catalogue; "
    "do not edit by hand.\n"
)


def render(ns: str = cat.DEFAULT_NAMESPACE, base: str = RUNBOOK_BASE) -> dict[Path, str]:
    """Every generated file and its content."""
    return {
        DASHBOARD_FILE: json.dumps(dashboard(ns), indent=2) + "\n",
        ALERTS_FILE: HEADER + to_yaml(alert_rules_document(ns, base)),
        ALERTS_TEST_FILE: HEADER
        + "# Run: promtool test rules dashboards/prometheus/alerts_test.yml\n"
        + to_yaml(alert_tests_document(ns, base)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    parser.add_argument("--namespace", default=cat.DEFAULT_NAMESPACE)
    parser.add_argument("--runbook-base", default=RUNBOOK_BASE)
    args = parser.parse_args(argv)
    stale = []
    for path, content in render(args.namespace, args.runbook_base).items():
        current = path.read_text() if path.exists() else None
        if current == content:
            continue
        stale.append(path.relative_to(HERE.parent))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{path}: {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
