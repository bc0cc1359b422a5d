"""The demo deployed the way users deploy it: gunicorn, three uvicorn workers, one /metrics.

``demo_app/gunicorn.conf.py`` is the shipped configuration; the database starts empty, so the
three workers create the schema at the same moment; ``PROMETHEUS_MULTIPROC_DIR`` is a fresh
directory. What is checked is what a user sees: the workers boot, every scrape shows the merged
counts of all workers exactly, the rows are in the database, and after a ``kill -9`` of a worker
its counters stay while its open sessions and connections leave the gauges.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import inspect
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import demo_app.app
from demo_app.app import Base, Settings, create_app

from .prom_support import free_port, stop
from .support import driver_url, postgres_url

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "demo_app" / "gunicorn.conf.py"
WORKERS = 3
POOL_MAX = Settings().pool_size + Settings().max_overflow
"""``db_pool_connections_max`` of one worker."""

CREATED = 150  # POST /items: 201, committed
REFUSED = 100  # POST /items/{id}/reserve beyond the stock: 409 after writing, rolled back
READ = 25  # GET /items/{id}: 200, committed
BOOM = 25  # POST /boom: writes, then raises: 500, rolled back
SENT = CREATED + REFUSED + READ + BOOM
HELD = 6  # GET /slow held open while a worker is killed
HOLD_SECONDS = 20


# ------------------------------------------------------------------------------ reading metrics


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def written_by(directory: Path, pid: int, name: str, **labels: str) -> float:
    """What the worker ``pid`` alone wrote to ``name``: its own files in the multiprocess
    directory, merged as a scrape merges all of them."""
    files = glob.glob(str(directory / f"*_{pid}.db"))
    return sum(
        sample.value
        for family in MultiProcessCollector.merge(files)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


# ---------------------------------------------------------------------------------- the server


@dataclass
class Server:
    master: subprocess.Popen[bytes]
    base: str
    multiproc_dir: Path
    log: Path
    check: sa.Engine

    def workers(self) -> set[int]:
        """The pids of the master's live children (its workers), read from /proc."""
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process is gone
                continue
            if int(fields[1]) == self.master.pid and fields[0] != "Z":
                found.add(int(stat.parent.name))
        return found

    def scrape(self) -> str:
        response = httpx.get(f"{self.base}/metrics/", timeout=10)
        assert response.status_code == 200, response.text
        return response.text

    def wait_for(self, what: str, condition: Callable[[str], bool], timeout: float = 60) -> str:
        """Scrape until ``condition(exposition)`` holds; fail with the log otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.master.poll() is None, f"gunicorn exited: {self.tail()}"
            try:
                text = self.scrape()
                if condition(text):
                    return text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"never saw {what}: {self.tail()}"
            time.sleep(0.2)

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        with self.check.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]

    def started_by_us(self, pid: int) -> bool:
        """Whether ``pid`` is still one of this server's processes (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.base.removeprefix("http://").encode() in cmdline

    def tail(self) -> str:
        """The end of gunicorn's output, without the access log."""
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if '"uvicorn.access"' not in line)[-4000:]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Server]:
    """``gunicorn -c demo_app/gunicorn.conf.py demo_app.main:app`` with 3 workers on a loopback
    port, on a PostgreSQL database without the demo's tables; always stopped afterwards."""
    url = postgres_url()
    assert url is not None
    check = sa.create_engine(driver_url(url, async_=False), poolclass=sa.NullPool)
    Base.metadata.drop_all(check)
    multiproc_dir = tmp_path / "prometheus"  # made by gunicorn.conf.py
    log = tmp_path / "gunicorn.log"
    port = free_port()
    env = dict(
        os.environ,
        DATABASE_URL=driver_url(url, async_=False),
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
        DEMO_LOG_LEVEL="WARNING",
    )
    command = [sys.executable, "-m", "gunicorn", "-c", str(CONF), "demo_app.main:app"]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS)]
    command += ["--graceful-timeout", "5", "--log-level", "warning"]
    with log.open("wb") as out:
        master = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(master, f"http://127.0.0.1:{port}", multiproc_dir, log, check)
    seen: set[int] = set()
    try:
        # Every worker has instrumented its pool once its lifespan ran (the schema is there).
        server.wait_for(
            f"{WORKERS} workers up",
            lambda text: value(text, "db_pool_connections_max") == WORKERS * POOL_MAX,
        )
        seen = server.workers()
        yield server
    finally:
        seen |= server.workers()
        stop(master)
        for pid in seen:  # a worker that outlived its master is ended by its pid
            if server.started_by_us(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        Base.metadata.drop_all(check)
        check.dispose()


# -------------------------------------------------------------------------------------- tests


def send(base: str, requests: list[tuple[str, str, dict[str, object] | None]]) -> list[int]:
    """Send the requests from 8 threads, each on a new connection (so every worker gets some);
    return the statuses in order."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=base, timeout=60, limits=limits) as client:

        def one(request: tuple[str, str, dict[str, object] | None]) -> int:
            method, path, body = request
            return client.request(method, path, json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, requests))


@pytest.mark.postgres
@pytest.mark.slow
def test_three_gunicorn_workers_start_on_an_empty_database_and_metrics_merge_every_worker(
    gunicorn: Server,
) -> None:
    started = time.monotonic()
    # 1. Traffic: committed writes, refused reservations, reads, exceptions.
    creates = [("POST", "/items", {"name": f"item-{i}", "stock": 1}) for i in range(CREATED)]
    assert send(gunicorn.base, creates) == [201] * CREATED
    ids = [row[0] for row in gunicorn.rows("select id from demo_items order by id")]
    assert len(ids) == CREATED
    mixed: list[tuple[str, str, dict[str, object] | None]] = []
    mixed += [("POST", f"/items/{ids[i]}/reserve?qty=5", None) for i in range(REFUSED)]
    mixed += [("GET", f"/items/{ids[i]}", None) for i in range(READ)]
    mixed += [("POST", "/boom", None) for _ in range(BOOM)]
    statuses = send(gunicorn.base, mixed)
    assert Counter(statuses) == {409: REFUSED, 200: READ, 500: BOOM}
    load_seconds = time.monotonic() - started

    # 2. Every scrape, whichever worker answers it, shows the figures of all workers.
    expected = {
        ("/items", "commit"): CREATED,
        ("/items/{item_id}/reserve", "rollback"): REFUSED,
        ("/items/{item_id}", "commit"): READ,
        ("/boom", "rollback"): BOOM,
    }
    for _ in range(6):
        text = gunicorn.scrape()
        closed = {
            key: value(text, "db_sessions_closed_total", route=key[0], outcome=key[1])
            for key in expected
        }
        assert closed == expected
        assert value(text, "db_sessions_closed_total") == SENT
        assert value(text, "db_session_rollbacks_total", reason="status_4xx") == REFUSED
        assert value(text, "db_session_rollbacks_total", reason="exception") == BOOM
        assert value(text, "db_session_duration_seconds_count") == SENT
        assert value(text, "db_sessions_open") == 0
        assert value(text, "db_pool_connections", state="used") == 0
        assert value(text, "db_pool_connections_max") == WORKERS * POOL_MAX
    # The rows: every create committed; every refused decrement and every /boom insert undone.
    assert gunicorn.rows("select count(*), sum(stock) from demo_items") == [(CREATED, CREATED)]
    # More than one worker served the traffic, and their shares add up to what /metrics shows.
    workers = gunicorn.workers()
    assert len(workers) == WORKERS
    shares = {
        pid: written_by(gunicorn.multiproc_dir, pid, "db_sessions_closed_total") for pid in workers
    }
    assert sum(shares.values()) == SENT
    assert sum(1 for share in shares.values() if share > 0) >= 2, shares

    # 3. Sessions held open in several workers; then one of those workers is killed.
    def hold() -> int | None:
        try:
            response = httpx.get(
                f"{gunicorn.base}/slow", params={"seconds": HOLD_SECONDS}, timeout=120
            )
        except httpx.TransportError:  # its worker was killed
            return None
        return response.status_code

    with ThreadPoolExecutor(HELD) as pool:
        held = [pool.submit(hold) for _ in range(HELD)]
        gunicorn.wait_for(
            f"{HELD} open sessions, suspected leaks past the demo's 2 s threshold",
            lambda text: (
                value(text, "db_sessions_open") == HELD
                and value(text, "db_sessions_leak_suspected") == HELD
            ),
        )
        holding = {
            pid: int(written_by(gunicorn.multiproc_dir, pid, "db_sessions_open")) for pid in workers
        }
        assert sum(holding.values()) == HELD
        victim = max(holding, key=lambda pid: (holding[pid] > 0, shares[pid]))
        lost = holding[victim]
        assert lost > 0
        assert shares[victim] > 0  # the victim's counts are part of the figures to keep
        os.kill(victim, signal.SIGKILL)

        # gunicorn's child_exit marks it dead: its open sessions and connections leave the
        # gauges; its counters stay; a new worker replaces it.
        text = gunicorn.wait_for(
            "the dead worker's sessions leave the gauges",
            lambda text: (
                value(text, "db_sessions_open") == HELD - lost
                and value(text, "db_sessions_leak_suspected") == HELD - lost
            ),
        )
        assert value(text, "db_pool_connections", state="used") == HELD - lost
        assert value(text, "db_sessions_closed_total") == SENT
        assert {
            key: value(text, "db_sessions_closed_total", route=key[0], outcome=key[1])
            for key in expected
        } == expected
        text = gunicorn.wait_for(
            "the replacement worker",
            lambda text: value(text, "db_pool_connections_max") == WORKERS * POOL_MAX,
        )
        replaced = gunicorn.workers()
        assert len(replaced) == WORKERS
        assert victim not in replaced
        outcomes = [future.result() for future in held]

    # 4. The held sessions of the live workers closed normally; nothing is left open.
    assert Counter(outcomes) == {200: HELD - lost, None: lost}
    text = gunicorn.scrape()
    assert value(text, "db_sessions_closed_total", route="/slow", outcome="commit") == HELD - lost
    assert value(text, "db_sessions_closed_total") == SENT + HELD - lost
    assert value(text, "db_sessions_open") == 0
    assert value(text, "db_pool_connections", state="used") == 0
    print(
        f"{SENT} requests over {len([s for s in shares.values() if s])} workers "
        f"(shares {sorted(int(s) for s in shares.values())}) in {load_seconds:.1f} s; "
        f"killed a worker holding {lost} of {HELD} sessions; whole test "
        f"{time.monotonic() - started:.1f} s"
    )


@pytest.mark.parametrize(
    "driver",
    [
        pytest.param("psycopg", marks=pytest.mark.postgres),
        pytest.param("asyncpg", marks=pytest.mark.postgres),
        "pysqlite",
        "aiosqlite",
    ],
)
def test_three_demo_apps_starting_at_once_on_an_empty_database_create_the_schema_once(
    driver: str, tmp_path: Path
) -> None:
    if driver in ("pysqlite", "aiosqlite"):
        database = tmp_path / "demo.db"
        check = sa.create_engine(f"sqlite:///{database}", poolclass=sa.NullPool)
        database_url = f"sqlite+{driver}:///{database}"
    else:
        url = postgres_url()
        assert url is not None
        check = sa.create_engine(driver_url(url, async_=False), poolclass=sa.NullPool)
        Base.metadata.drop_all(check)
        database_url = driver_url(url, async_=driver == "asyncpg")
    apps = [create_app(Settings(database_url=database_url)) for _ in range(3)]
    start = threading.Barrier(len(apps))
    failures: list[BaseException] = []

    def run_lifespan(app: object) -> None:
        async def main() -> None:
            start.wait()
            async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
                pass

        try:
            anyio.run(main)
        except BaseException as exc:
            failures.append(exc)

    # Three event loops in three threads: the startups overlap as three workers' do.
    threads = [threading.Thread(target=run_lifespan, args=(app,)) for app in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert failures == []
        tables = sa.inspect(check).get_table_names()
        assert set(Base.metadata.tables) <= set(tables)
    finally:
        Base.metadata.drop_all(check)
        check.dispose()


PYTHON_BLOCK = re.compile(r"```python\n(?P<code>.*?)\n```", re.S)


def test_the_deployment_page_shows_the_shipped_configuration_and_code() -> None:
    page = (ROOT / "docs" / "deployment.md").read_text()
    blocks = [match["code"] + "\n" for match in PYTHON_BLOCK.finditer(page)]
    assert CONF.read_text() in blocks
    for name in ("metrics_app", "create_schema"):
        source = inspect.getsource(getattr(demo_app.app, name))
        assert any(source in block for block in blocks), f"the demo's {name} is not on the page"
    assert any(f"SCHEMA_LOCK: Final = 0x{demo_app.app.SCHEMA_LOCK:_X}\n" in b for b in blocks)


# ------------------------------------------------------------------- the hooks of gunicorn.conf.py


def load_conf() -> ModuleType:
    """``demo_app/gunicorn.conf.py`` executed as gunicorn executes it (a file, not a package)."""
    spec = importlib.util.spec_from_file_location("demo_gunicorn_conf", CONF)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_multiproc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither variable is set, and whatever the config sets is undone after the test (setenv
    first: delenv of an unset variable would not restore it)."""
    for name in ("PROMETHEUS_MULTIPROC_DIR", "DEMO_PROMETHEUS_MULTIPROC_DIR_MADE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args)


@pytest.mark.usefixtures("no_multiproc_env")
def test_the_gunicorn_config_empties_a_named_metrics_directory_at_start_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = ["counter_41.db", "gauge_livesum_41.db", "gauge_livemax_41.db", "histogram_41.db"]
    for name in [*stale, "README.txt"]:
        (directory / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    conf = load_conf()
    server = SimpleNamespace(log=Log())
    conf.on_starting(server)
    assert sorted(p.name for p in directory.iterdir()) == ["README.txt"]
    assert server.log.lines == [
        f"prometheus multiprocess directory {directory} (4 stale files removed)"
    ]
    conf.on_exit(server)
    assert directory.is_dir()  # the user named it: kept


@pytest.mark.usefixtures("no_multiproc_env")
def test_the_gunicorn_config_makes_a_metrics_directory_when_none_is_named_and_removes_it_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    conf = load_conf()
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.parent == tmp_path
    assert made.is_dir()
    conf.on_starting(SimpleNamespace(log=Log()))
    conf.on_exit(SimpleNamespace(log=Log()))
    assert not made.exists()


@pytest.mark.usefixtures("no_multiproc_env")
def test_the_gunicorn_config_drops_a_dead_workers_live_gauges_and_keeps_its_counters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    files = ["counter_41.db", "histogram_41.db", "gauge_livesum_41.db", "gauge_livemax_41.db"]
    files += ["gauge_livesum_42.db"]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    load_conf().child_exit(SimpleNamespace(log=Log()), SimpleNamespace(pid=41))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_41.db",
        "gauge_livesum_42.db",
        "histogram_41.db",
    ]
