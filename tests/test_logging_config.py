"""Where the events go depends on how the application configured logging, as for any library.

Each test runs an application in a fresh interpreter (logging configuration is per process):
a Starlette app on a SQLite file whose routes commit (201), roll back (409), fail to commit
(a deferred foreign key, 500) and find the one-connection pool busy (503).

* No logging configured: nothing on stdout or stderr for requests that go well; warnings and
  errors reach stderr through Python's last-resort handler, like any library's.
* Standard ``logging`` configured: every event is a record of logger ``sessionscope`` whose
  message is the event name and its fields as ``key=value``, the fields are attributes of the
  record (``extra``) too, and an event about an exception carries it as ``exc_info``.
* structlog configured: structlog gets the events, as it always did, and ``logging`` none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .test_readme import runnable_examples

APP = r'''
import json
import logging
import sys

import anyio
import httpx
import sqlalchemy as sa
from sqlalchemy import event
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from sessionscope import DBSessionMiddleware
mode, database, *paths = sys.argv[1:]

RECORD_ATTRIBUTES = {*vars(logging.makeLogRecord({})), "message", "asctime"}


class PrintRecords(logging.Handler):
    """What a JSON formatter would write: the record's message, level and extra fields."""

    def emit(self, record):
        extra = {k: v for k, v in vars(record).items() if k not in RECORD_ATTRIBUTES}
        line = {"logger": record.name, "level": record.levelname, "message": record.getMessage()}
        if record.exc_info:
            line["exc_info"] = logging.Formatter().formatException(record.exc_info)
        print(json.dumps({**line, **extra}, default=str), flush=True)


def configure_logging(kind):
    """``stdlib``: logging at DEBUG; ``structlog``: structlog, and logging too (for others)."""
    logging.basicConfig(level=logging.DEBUG, handlers=[PrintRecords()])
    if kind == "structlog":
        import structlog

        structlog.configure(
            processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
            logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        )


if mode in ("stdlib", "structlog"):
    configure_logging(mode)
elif mode == "basic":
    logging.basicConfig(level=logging.DEBUG)  # the default format, on stderr

engine = sa.create_engine(
    f"sqlite:///{database}", pool_size=1, max_overflow=0, pool_timeout=0.1
)


@event.listens_for(engine, "connect")
def foreign_keys_on(dbapi_connection, record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


metadata = sa.MetaData()
parents = sa.Table("parents", metadata, sa.Column("id", sa.Integer, primary_key=True))
children = sa.Table(
    "children",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "parent_id",
        sa.Integer,
        sa.ForeignKey("parents.id", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
)
metadata.create_all(engine)


def add_parent(request):
    request.state.db.execute(parents.insert().values(id=request.path_params["id"]))
    return Response(status_code=201)


def refuse_parent(request):
    request.state.db.execute(parents.insert().values(id=request.path_params["id"]))
    return Response(status_code=409)


def add_orphan(request):
    request.state.db.execute(children.insert().values(parent_id=999))  # checked at commit
    return Response(status_code=201)


def count(request):
    request.state.db.execute(sa.select(sa.func.count()).select_from(parents))
    return Response(status_code=200)


app = Starlette(
    routes=[
        Route("/parents/{id:int}", add_parent, methods=["POST"]),
        Route("/refused/{id:int}", refuse_parent, methods=["POST"]),
        Route("/orphans", add_orphan, methods=["POST"]),
        Route("/busy", count),
    ]
)
app.add_middleware(DBSessionMiddleware, engine=engine)



async def main():
    statuses = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for n, path in enumerate(paths):
            if n == 1 and mode.startswith("late-"):  # after the app served a request
                configure_logging(mode.removeprefix("late-"))
            if path == "/busy":
                with engine.connect():  # the pool's only connection
                    statuses.append((await client.get(path)).status_code)
            else:
                statuses.append((await client.post(path)).status_code)
    with open(f"{database}.statuses", "w") as out:
        json.dump(statuses, out)


anyio.run(main)
'''

REQUESTS = ["/parents/1", "/refused/2", "/orphans", "/busy"]


def run_app(tmp_path: Path, mode: str, *paths: str) -> tuple[str, str, list[int], list[int]]:
    """Run the app with logging ``mode`` on ``paths``: stdout, stderr, statuses, parent ids."""
    (tmp_path / "app.py").write_text(APP)
    database = tmp_path / f"{mode}.db"
    done = subprocess.run(
        [sys.executable, "app.py", mode, str(database), *paths],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = json.loads(Path(f"{database}.statuses").read_text())
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as conn:
        ids = list(conn.scalars(sa.text("SELECT id FROM parents ORDER BY id")))
    engine.dispose()
    return done.stdout, done.stderr, statuses, ids


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_an_app_that_configures_no_logging_prints_nothing_for_requests_that_go_well(
    tmp_path: Path,
) -> None:
    stdout, stderr, statuses, ids = run_app(tmp_path, "none", "/parents/1", "/refused/2")
    assert statuses == [201, 409]
    assert ids == [1]  # the commit and the rollback happened
    assert stdout == ""
    assert stderr == ""


def test_an_app_that_configures_no_logging_sees_warnings_and_errors_on_stderr(
    tmp_path: Path,
) -> None:
    stdout, stderr, statuses, _ = run_app(tmp_path, "none", "/orphans", "/busy")
    assert statuses == [500, 503]
    assert stdout == ""
    lines = stderr.splitlines()
    events = [line.split(" ", 1)[0] for line in lines if line.startswith("db_")]
    assert events == ["db_session.commit_failed", "db_pool.timeout", "db_session.pool_timeout"]
    (commit_failed,) = [line for line in lines if line.startswith("db_session.commit_failed")]
    assert "error_type=IntegrityError" in commit_failed
    assert "route=/orphans" in commit_failed
    assert "db_session.closed" not in stderr


def test_an_app_that_configures_logging_gets_every_event_as_a_sessionscope_record(
    tmp_path: Path,
) -> None:
    stdout, _, statuses, _ = run_app(tmp_path, "stdlib", *REQUESTS)
    assert statuses == [201, 409, 500, 503]
    records = [r for r in json_lines(stdout) if r["logger"].startswith("sessionscope")]
    assert [(r["logger"], r["level"], r["message"].split(" ", 1)[0]) for r in records] == [
        ("sessionscope", "DEBUG", "db_session.closed"),
        ("sessionscope", "DEBUG", "db_session.closed"),
        ("sessionscope", "ERROR", "db_session.commit_failed"),
        ("sessionscope", "DEBUG", "db_session.closed"),
        ("sessionscope", "ERROR", "db_pool.timeout"),
        ("sessionscope", "WARNING", "db_session.pool_timeout"),
        ("sessionscope", "DEBUG", "db_session.closed"),
    ]
    closed = records[0]
    assert closed["db"] == "default"
    assert closed["route"] == "/parents/{id:int}"
    assert closed["method"] == "POST"
    assert closed["status"] == 201
    assert closed["outcome"] == "commit"
    assert closed["statements"] == 1
    assert len(closed["request_id"]) == 32
    assert [
        (r["status"], r["outcome"], r["reason"])
        for r in records
        if r["message"].startswith("db_session.closed ")
    ] == [
        (201, "commit", None),
        (409, "rollback", "status_4xx"),
        (201, "rollback", "commit_error"),
        (503, "rollback", "pool_timeout"),
    ]
    assert closed["message"].startswith(
        "db_session.closed status=201 outcome=commit reason=None duration_s="
    )
    assert "route=/parents/{id:int} method=POST request_id=" in closed["message"]
    failed = records[2]
    assert failed["error_type"] == "IntegrityError"
    assert failed["driver_error"] == "IntegrityError"
    assert failed["traceback"]  # the frames, as an attribute for JSON formatters
    assert failed["message"].startswith(
        "db_session.commit_failed phase=commit status=201 error_type=IntegrityError "
    )
    assert "\n" not in failed["message"]  # the traceback is the record's exc_info, once
    assert failed["exc_info"].startswith("Traceback (most recent call last):")
    assert "IntegrityError" in failed["exc_info"].splitlines()[-1]
    assert "INSERT INTO" not in failed["exc_info"]  # a database error's message is withheld
    assert records[4]["pool_size"] == 1
    assert records[4]["message"].startswith("db_pool.timeout db=default pool_size=1 ")


def test_an_app_with_logging_basic_config_shows_the_fields_and_the_traceback(
    tmp_path: Path,
) -> None:
    stdout, stderr, statuses, _ = run_app(tmp_path, "basic", "/parents/1", "/orphans")
    assert statuses == [201, 500]
    assert stdout == ""
    lines = stderr.splitlines()
    closed = [line for line in lines if line.startswith("DEBUG:sessionscope:db_session.closed")]
    assert closed[0].startswith(
        "DEBUG:sessionscope:db_session.closed status=201 outcome=commit reason=None "
    )
    assert "route=/parents/{id:int}" in closed[0]
    (failed,) = [n for n, line in enumerate(lines) if "db_session.commit_failed" in line]
    assert lines[failed].startswith(
        "ERROR:sessionscope:db_session.commit_failed phase=commit status=201 "
        "error_type=IntegrityError driver_error=IntegrityError "
    )
    assert lines[failed + 1] == "Traceback (most recent call last):"
    assert "[SQL:" not in stderr
    assert "[parameters:" not in stderr


@pytest.mark.parametrize("kind", ["stdlib", "structlog"])
def test_logging_configured_after_the_app_served_requests_gets_the_next_events(
    kind: str, tmp_path: Path
) -> None:
    stdout, stderr, statuses, _ = run_app(tmp_path, f"late-{kind}", "/parents/1", "/parents/2")
    assert statuses == [201, 201]
    lines = json_lines(stdout)
    if kind == "stdlib":
        events = [line for line in lines if line["logger"] == "sessionscope"]
        assert [(e["message"].split(" ", 1)[0], e["route"]) for e in events] == [
            ("db_session.closed", "/parents/{id:int}")
        ]
    else:
        events = [line for line in lines if "event" in line]
        assert [(e["event"], e["route"]) for e in events] == [
            ("db_session.closed", "/parents/{id:int}")
        ]
    assert stderr == ""


def test_capturing_session_events_leaves_structlog_as_it_found_it() -> None:
    script = textwrap.dedent(
        """
        import structlog
        from sessionscope.testing import capture_session_events

        with capture_session_events():
            assert structlog.is_configured()
        assert not structlog.is_configured(), "left configured"
        structlog.configure(processors=[structlog.processors.JSONRenderer()])
        with capture_session_events():
            pass
        assert structlog.is_configured(), "unconfigured"
        assert len(structlog.get_config()["processors"]) == 1
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_app_that_configures_structlog_gets_the_events_from_structlog_only(
    tmp_path: Path,
) -> None:
    stdout, _, statuses, _ = run_app(tmp_path, "structlog", *REQUESTS)
    assert statuses == [201, 409, 500, 503]
    lines = json_lines(stdout)
    events = [line for line in lines if "event" in line]
    assert [(e["event"], e["level"]) for e in events] == [
        ("db_session.closed", "debug"),
        ("db_session.closed", "debug"),
        ("db_session.commit_failed", "error"),
        ("db_session.closed", "debug"),
        ("db_pool.timeout", "error"),
        ("db_session.pool_timeout", "warning"),
        ("db_session.closed", "debug"),
    ]
    assert events[0]["outcome"] == "commit"
    assert events[0]["route"] == "/parents/{id:int}"
    assert events[2]["error_type"] == "IntegrityError"
    assert [line for line in lines if line.get("logger", "").startswith("sessionscope")] == []


def test_the_logging_page_has_a_runnable_example_of_each_setup() -> None:
    # test_every_runnable_example_in_the_readme_and_docs_runs runs them
    examples = [p.values[1] for p in runnable_examples() if str(p.id).startswith("logging.md-")]
    assert len(examples) == 3
    nothing, stdlib, with_structlog = examples
    assert "logging." not in nothing
    assert "structlog" not in nothing
    assert "logging.basicConfig(" in stdlib
    assert "structlog" not in stdlib
    assert "structlog.configure(" in with_structlog


def test_a_failing_hook_reaches_logging_handlers_with_its_exception(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import logging

        import sqlalchemy as sa
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route
        from starlette.testclient import TestClient

        from sessionscope import DBSessionMiddleware, on_commit

        records = []


        class Keep(logging.Handler):  # what Sentry's or OpenTelemetry's handler is given
            def emit(self, record):
                records.append(record)


        logging.basicConfig(level=logging.INFO, handlers=[Keep()])


        def send_receipt():
            raise ValueError("mail server down")


        def order(request):
            request.state.db.execute(sa.text("SELECT 1"))
            on_commit(request.state.db, send_receipt)
            return Response(status_code=201)


        engine = sa.create_engine("sqlite:///{tmp_path / "hook.db"}")
        app = Starlette(routes=[Route("/orders", order, methods=["POST"])])
        app.add_middleware(DBSessionMiddleware, engine=engine)
        with TestClient(app) as client:
            assert client.post("/orders").status_code == 201
        (failed,) = [r for r in records if r.name == "sessionscope"]
        kind, exc, tb = failed.exc_info
        print(failed.getMessage().split(" hook=")[0], kind.__name__, exc, sep="|")
        print(tb is exc.__traceback__)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = done.stdout.splitlines()
    assert first == "db_session.hook_failed|ValueError|mail server down"
    assert second == "True"
