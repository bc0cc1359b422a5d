"""The demo app, in process: each route shows its behaviour in statuses, rows and metrics.

Every test runs on SQLite (sync driver and aiosqlite) and PostgreSQL (psycopg and asyncpg; those
skip without SESSIONSCOPE_TEST_POSTGRES_URL); rows are read behind the app's back through a
separate engine.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from starlette.routing import Mount
from structlog.testing import capture_logs

import demo_app.app
from demo_app import load
from demo_app.app import Base, Settings, create_app
from demo_app.logs import UVICORN_LOGGERS, configure_logging

from .support import driver_url, postgres_url

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio


@dataclass
class Demo:
    app: FastAPI
    client: httpx.AsyncClient
    transport: httpx.ASGITransport
    check: sa.Engine

    @property
    def registry(self) -> CollectorRegistry:
        registry: CollectorRegistry = self.app.state.registry
        return registry

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        with self.check.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, {"db": "default", **labels})
        return 0.0 if value is None else value

    async def create(self, name: str, stock: int = 10) -> int:
        r = await self.client.post("/items", json={"name": name, "stock": stock})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


@pytest.fixture(params=["sqlite", "sqlite+aiosqlite", "pg-sync", "pg-async"])
async def demo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Demo]:
    if request.param.startswith("pg"):
        url = postgres_url()
        assert url is not None
        check = sa.create_engine(driver_url(url, async_=False), poolclass=sa.NullPool)
        Base.metadata.drop_all(check)
        database_url = driver_url(url, async_=request.param == "pg-async")
    else:
        file = tmp_path / "demo.db"
        check = sa.create_engine(f"sqlite:///{file}", poolclass=sa.NullPool)
        database_url = f"{request.param}:///{file}"
    app = create_app(Settings(database_url=database_url, leak_threshold=0.3))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
    ):
        yield Demo(app, client, transport, check)
    check.dispose()


async def test_creating_an_item_commits_it_before_the_201(demo: Demo) -> None:
    item_id = await demo.create("teapot", stock=3)
    assert demo.rows("select id, name, stock from demo_items") == [(item_id, "teapot", 3)]
    assert demo.metric("db_sessions_closed_total", route="/items", outcome="commit") == 1


async def test_a_duplicate_item_is_a_409_and_adds_no_row(demo: Demo) -> None:
    await demo.create("teapot")
    r = await demo.client.post("/items", json={"name": "teapot"})
    assert r.status_code == 409
    assert demo.rows("select name from demo_items") == [("teapot",)]


async def test_reading_and_listing_return_committed_rows_and_a_missing_item_is_404(
    demo: Demo,
) -> None:
    a = await demo.create("a")
    await demo.create("b")
    r = await demo.client.get(f"/items/{a}")
    assert (r.status_code, r.json()["name"]) == (200, "a")
    r = await demo.client.get("/items")
    assert [i["name"] for i in r.json()] == ["a", "b"]
    assert (await demo.client.get("/items/999")).status_code == 404


async def test_reserving_more_than_the_stock_is_a_409_and_the_written_decrement_is_rolled_back(
    demo: Demo,
) -> None:
    item = await demo.create("lamp", stock=5)
    ok = await demo.client.post(f"/items/{item}/reserve", params={"qty": 2})
    assert (ok.status_code, ok.json()["stock"]) == (200, 3)
    refused = await demo.client.post(f"/items/{item}/reserve", params={"qty": 4})
    assert refused.status_code == 409
    assert demo.rows("select stock from demo_items") == [(3,)]
    assert demo.metric("db_session_rollbacks_total", reason="status_4xx") == 1


async def test_an_exception_after_writing_is_a_500_and_the_write_is_rolled_back(
    demo: Demo,
) -> None:
    r = await demo.client.post("/boom")
    assert r.status_code == 500
    assert demo.rows("select name from demo_items") == []
    assert demo.metric("db_session_rollbacks_total", reason="exception") == 1


async def test_a_commit_that_fails_on_the_deferred_foreign_key_becomes_a_500_with_no_row(
    demo: Demo,
) -> None:
    with capture_logs() as logs:
        r = await demo.client.post("/notes/orphan")
    assert r.status_code == 500
    assert demo.rows("select id from demo_notes") == []
    assert demo.metric("db_session_rollbacks_total", reason="commit_error") == 1
    assert demo.metric("db_session_errors_total", phase="commit", error_type="IntegrityError") == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["db_session.commit_failed"]


async def test_a_background_task_with_its_own_session_scope_commits_its_write(demo: Demo) -> None:
    item = await demo.create("chair")
    r = await demo.client.post(f"/items/{item}/audit")
    assert r.status_code == 202
    assert demo.rows("select kind, item_id from demo_events") == [("audit", item)]


async def test_a_background_write_through_the_request_session_is_rolled_back_and_reported(
    demo: Demo,
) -> None:
    item = await demo.create("desk")
    with capture_logs() as logs:
        r = await demo.client.post(f"/items/{item}/audit-late")
    assert r.status_code == 202
    assert demo.rows("select kind from demo_events") == []
    assert "db_session.late_write" in [e["event"] for e in logs]
    assert demo.metric("db_session_rollbacks_total", reason="late_write") == 1


async def test_the_streaming_export_reads_every_row_after_the_decision(demo: Demo) -> None:
    for i in range(7):
        await demo.create(f"item-{i}")
    r = await demo.client.get("/export", params={"batch": 3})
    assert r.status_code == 200
    lines = r.text.splitlines()
    assert lines[0] == "id,name,stock"
    assert [line.split(",")[1] for line in lines[1:]] == [f"item-{i}" for i in range(7)]


async def test_the_n_plus_one_route_runs_one_statement_per_item_plus_one(demo: Demo) -> None:
    for i in range(4):
        item = await demo.create(f"n-{i}")
        r = await demo.client.post(f"/items/{item}/notes", json={"text": f"note {i}"})
        assert r.status_code == 201
    r = await demo.client.get("/items-with-notes")
    assert r.status_code == 200
    assert [i["notes"] for i in r.json()] == [[f"note {i}"] for i in range(4)]
    assert demo.metric("db_statements_total", route="/items-with-notes") == 1 + 4


async def test_a_session_held_past_the_leak_threshold_is_detected_then_resolved(
    demo: Demo,
) -> None:
    with capture_logs() as logs:
        r = await demo.client.get("/slow", params={"seconds": 0.9})
    assert r.status_code == 200
    assert demo.metric("db_session_leaks_detected_total", route="/slow") == 1
    assert demo.metric("db_session_leaks_resolved_total", route="/slow") == 1
    assert any("leak" in str(e["event"]) for e in logs)


async def test_the_leak_scenario_holds_one_session_past_the_threshold_then_closes_it(
    demo: Demo,
) -> None:
    out = io.StringIO()
    config = load.Config(scenario="leak", hold_seconds=0.8)
    status = await load.hold_session(config, out=out, transport=demo.transport)
    assert status == 200
    first, *_, last = out.getvalue().splitlines()
    assert first.startswith("holding one request session on http://127.0.0.1:8000/hold for 0.8 s")
    assert last.startswith("200 after ")
    assert '"client_left":false' in last
    assert demo.metric("db_session_leaks_detected_total", route="/hold") == 1
    assert demo.metric("db_session_leaks_resolved_total", route="/hold") == 1
    assert demo.metric("db_sessions_closed_total", route="/hold", outcome="commit") == 1
    assert demo.metric("db_sessions_open") == 0


@pytest.mark.parametrize("demo", ["sqlite"], indirect=True)
async def test_hold_refuses_no_time_and_more_than_an_hour(demo: Demo) -> None:
    for seconds in ("0", "3601"):
        r = await demo.client.get("/hold", params={"seconds": seconds})
        assert r.status_code == 422, r.text
    assert demo.metric("db_sessions_closed_total", route="/hold", outcome="commit") == 0


def test_the_load_generator_takes_the_leak_scenario_and_bounds_the_hold() -> None:
    config, _ = load.parse_args(["--scenario", "leak", "--hold-seconds", "330"])
    assert (config.scenario, config.hold_seconds) == ("leak", 330)
    assert load.parse_args([])[0].hold_seconds == 420 > 5 * 60  # past the alert's for: 5m
    assert load.HOLD_MAX_SECONDS == demo_app.app.HOLD_MAX_SECONDS
    for bad in ("0", "3601"):
        with pytest.raises(SystemExit):
            load.parse_args(["--scenario", "leak", "--hold-seconds", bad])


async def test_a_task_that_outlives_its_request_cannot_use_the_request_session(
    demo: Demo,
) -> None:
    r = await demo.client.post("/fire-and-forget")
    assert r.status_code == 202
    await anyio.sleep(0.6)  # the task uses the session 0.2 s after the request
    assert demo.metric("db_session_use_after_close_total", route="/fire-and-forget") == 1


async def test_routes_without_database_work_create_no_session(demo: Demo) -> None:
    for path in ("/time", "/healthz", "/metrics/"):
        assert (await demo.client.get(path)).status_code == 200
    names = {s.labels.get("route") for m in demo.registry.collect() for s in m.samples}
    assert not names & {"/time", "/healthz", "/metrics", "/metrics/"}
    assert demo.metric("db_sessions_open") == 0


async def test_the_metrics_endpoint_exports_the_session_metrics(demo: Demo) -> None:
    await demo.create("x")
    r = await demo.client.get("/metrics", follow_redirects=True)
    assert r.status_code == 200
    assert 'db_sessions_closed_total{db="default",outcome="commit",route="/items"} 1.0' in r.text


async def test_the_openapi_page_documents_the_purpose_of_every_route(demo: Demo) -> None:
    spec = (await demo.client.get("/openapi.json")).json()
    operations = [op for path in spec["paths"].values() for op in path.values()]
    assert len(operations) == 17
    assert all(op.get("summary") and op.get("tags") for op in operations)
    # Everything the app serves is on the page, mounted apps included (FastAPI leaves those
    # out by itself); a mount is documented at the path it answers, with its trailing slash.
    served = {r.path for r in demo.app.routes if isinstance(r, APIRoute) and r.include_in_schema}
    served |= {f"{r.path}/" for r in demo.app.routes if isinstance(r, Mount)}
    assert served == set(spec["paths"])
    metrics = spec["paths"]["/metrics/"]["get"]
    assert metrics["tags"] == ["ops"]
    assert "Prometheus" in metrics["summary"]
    scraped = await demo.client.get("/metrics/")
    assert scraped.status_code == 200
    assert "db_sessions_open" in scraped.text


async def test_the_load_generator_runs_its_mix_and_gets_only_expected_statuses(
    demo: Demo,
) -> None:
    config = load.Config(duration=1.5, rate=0, concurrency=4, slow_seconds=0.4, seed=1)
    config.mix = {s.name: 1 for s in load.SCENARIOS}
    summary = await load.run_load(config, transport=demo.transport)
    assert summary.ok, load.format_summary(summary)
    assert set(summary.per_scenario) == {s.name for s in load.SCENARIOS}
    assert sum(s.count for s in summary.per_scenario.values()) > 20
    table = load.format_summary(summary)
    assert "TOTAL" in table
    assert "p95 ms" in table


BAR = re.compile(
    r"\[(?P<bar>[#.]{30})\] +\d+\.\d/1s +(?P<requests>\d+) requests +\d+\.\d/s +0 unexpected"
)


@pytest.mark.parametrize("demo", ["sqlite"], indirect=True)
async def test_the_load_generator_draws_a_progress_bar_then_prints_the_summary_table(
    demo: Demo,
) -> None:
    out = io.StringIO()
    config = load.Config(duration=1.0, rate=40, concurrency=2, seed=2, progress=True)
    config.mix = {"read": 3, "no_db": 1}
    summary = await load.run_and_report(config, out=out, progress_out=out, transport=demo.transport)
    bars, _, table = out.getvalue().rpartition("\n")[0].partition("\n")
    frames = bars.split("\r")
    assert frames[0] == ""  # each frame redraws the line from its start
    matches = [BAR.fullmatch(frame) for frame in frames[1:]]
    assert len(matches) >= 3, frames  # drawn every 0.25 s over 1 s, and once at the end
    assert all(matches), frames
    counts = [int(m["requests"]) for m in matches if m]
    assert counts == sorted(counts)
    last = matches[-1]
    assert last is not None
    assert last["bar"] == "#" * 30
    assert int(last["requests"]) == summary.total.count > 0
    lines = table.splitlines()
    assert lines[0].split() == ["scenario", "requests", "statuses", "errors", "p50", "ms",
                                "p95", "ms", "max", "ms"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[2:-1] if not line.startswith("-")}
    assert set(rows) == {"read", "no_db", "TOTAL"}
    assert rows["read"][2] == f"200:{summary.per_scenario['read'].count}"
    assert rows["TOTAL"][1] == str(summary.total.count)
    assert re.fullmatch(r"\d+ requests in \d+\.\d s \(\d+\.\d/s\)", lines[-1])


def test_the_load_generator_refuses_an_unknown_scenario_in_its_mix() -> None:
    assert load.parse_mix("create=2, slow") == {"create": 2, "slow": 1}
    with pytest.raises(Exception, match="unknown scenario 'nope'"):
        load.parse_mix("nope=1")


# -- logs ------------------------------------------------------------------------------------


@contextmanager
def demo_logging(level: str = "INFO") -> Iterator[None]:
    """The demo's ``configure_logging``, undone afterwards: structlog's defaults and the
    stdlib loggers (including the handlers pytest put on the root logger) are restored."""
    root = logging.getLogger()
    saved_root = root.handlers[:], root.level
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in UVICORN_LOGGERS}  # fmt: skip
    configure_logging(level)
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:], level = saved_root
        root.setLevel(level)
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate


async def test_the_demo_logs_structlog_events_and_stdlib_records_as_one_json_object_per_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo's module-level logger is a lazy proxy that would keep the JSON configuration
    # once used (cache_logger_on_first_use): this test uses a fresh one, dropped afterwards.
    monkeypatch.setattr(demo_app.app, "log", structlog.get_logger("demo_app"))
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'demo.db'}"))
    transport = httpx.ASGITransport(app=app)
    with demo_logging():
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://demo") as client,
        ):
            assert (await client.post("/items", json={"name": "teapot"})).status_code == 201
            assert (await client.post("/items", json={"name": "teapot"})).status_code == 409
        logging.getLogger("uvicorn.error").warning("a stdlib record")
    lines = capsys.readouterr().out.splitlines()
    assert lines
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e["event"], str) and e["level"] and e["timestamp"] for e in events)
    assert [e["level"] for e in events if e["event"] == "demo.started"] == ["info"]
    closed = [e for e in events if e["event"] == "db_session.closed"]
    assert [(e["route"], e["status"], e["outcome"]) for e in closed] == [
        ("/items", 201, "commit"),
        ("/items", 409, "rollback"),
    ]
    assert {"event": "a stdlib record", "level": "warning", "logger": "uvicorn.error"}.items() <= (
        events[-1].items()
    )


def test_the_app_make_demo_serves_logs_json_from_the_moment_it_is_imported(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        """
        import logging

        import structlog

        from demo_app.main import app

        structlog.get_logger("check").info("check.structlog", answer=42)
        logging.getLogger("uvicorn.access").info("check.stdlib")
        """
    )
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(e["event"], e["level"], e["logger"]) for e in events] == [
        ("check.structlog", "info", "check"),
        ("check.stdlib", "info", "uvicorn.access"),
    ]
    assert events[0]["answer"] == 42
