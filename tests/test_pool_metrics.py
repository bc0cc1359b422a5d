"""Pool metrics of real engines: SQLite (QueuePool on a file) and PostgreSQL (psycopg, asyncpg).

Every test reads samples from its own ``CollectorRegistry`` and compares the state gauges with
what the pool itself reports. Nothing of SQLAlchemy is mocked.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AssertionPool, NullPool, Pool, SingletonThreadPool, StaticPool
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware
from sessionscope._metrics import Metrics
from sessionscope._pool import PoolInstruments, instrument_pool

from .prometheus_tools import promtool
from .support import Backend, Exchange, backend_for, driver_url, postgres_url, request

DB = "main"
POOL_EVENTS = (
    "connect",
    "checkout",
    "checkin",
    "close",
    "close_detached",
    "invalidate",
    "soft_invalidate",
)


# ------------------------------------------------------------------------------- helpers


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """Make sync engines (``sqlite`` file, ``pg`` psycopg); all are disposed after the test."""
    made: list[Engine] = []

    def make(kind: str = "sqlite", **kw: Any) -> Engine:
        if kind == "sqlite":
            kw.setdefault("connect_args", {"check_same_thread": False, "timeout": 30})
            engine = sa.create_engine(f"sqlite:///{tmp_path / 'pool.db'}", **kw)
        else:
            url = postgres_url()
            assert url is not None
            engine = sa.create_engine(driver_url(url, async_=False), **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


def asyncpg_engine(**kw: Any) -> AsyncEngine:
    url = postgres_url()
    assert url is not None
    return create_async_engine(driver_url(url, async_=True), **kw)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The value of ``db_<name>{db="main", **labels}``, None when the series does not exist."""
    return registry.get_sample_value(f"db_{name}", {"db": DB, **labels})


def used(registry: CollectorRegistry) -> float | None:
    return sample(registry, "pool_connections", state="used")


def idle(registry: CollectorRegistry) -> float | None:
    return sample(registry, "pool_connections", state="idle")


def waits(registry: CollectorRegistry) -> float:
    return sample(registry, "pool_wait_seconds_count") or 0.0


def pool_state(engine: Engine) -> tuple[int, int]:
    """``(checkedout(), checkedin())`` of the engine's current pool."""
    pool: Any = engine.pool
    return pool.checkedout(), pool.checkedin()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def listener_counts(engine: Engine) -> list[int]:
    pool: Any = engine.pool
    counts = [len(getattr(pool.dispatch, name)) for name in POOL_EVENTS]
    counts.append(len(engine.dialect.dispatch.do_connect))
    return counts


# ----------------------------------------------------------------------- state gauges


def test_connection_gauges_read_used_and_idle_connections_from_the_pool(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines(pool_size=2, max_overflow=2)
    instrument_pool(engine, Metrics.on(registry), DB)
    assert (used(registry), idle(registry)) == (0, 0)

    held = [engine.connect() for _ in range(3)]
    assert (used(registry), idle(registry)) == (3, 0) == pool_state(engine)
    held.pop().close()
    assert (used(registry), idle(registry)) == (2, 1) == pool_state(engine)
    held.pop().close()
    assert (used(registry), idle(registry)) == (1, 2) == pool_state(engine)
    held.pop().close()  # the queue is full: this one is closed, not kept idle
    assert (used(registry), idle(registry)) == (0, 2) == pool_state(engine)
    assert sample(registry, "pool_connections_closed_total") == 1


@pytest.mark.parametrize(
    ("pool_size", "max_overflow", "expected"),
    [(5, 10, 15.0), (3, 0, 3.0), (2, -1, math.inf), (0, 4, math.inf)],
)
def test_max_connections_is_pool_size_plus_overflow_and_infinite_without_a_limit(
    engines: Callable[..., Engine],
    registry: CollectorRegistry,
    pool_size: int,
    max_overflow: int,
    expected: float,
) -> None:
    engine = engines(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=7.5)
    instrument_pool(engine, Metrics.on(registry), DB)
    assert sample(registry, "pool_connections_max") == expected
    assert sample(registry, "pool_timeout_seconds") == 7.5


@pytest.mark.postgres
def test_gauges_match_the_pool_during_concurrent_checkouts_on_postgres(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines("pg", pool_size=3, max_overflow=3, pool_timeout=10)
    instrument_pool(engine, Metrics.on(registry), DB)
    checkouts = 0

    # Hold k connections from k threads, compare while all are held, release.
    for k in (1, 3, 5, 6, 2):
        holding = threading.Barrier(k + 1)
        release = threading.Event()

        def hold(barrier: threading.Barrier = holding, go: threading.Event = release) -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
                barrier.wait(timeout=10)
                go.wait(timeout=10)

        threads = [threading.Thread(target=hold) for _ in range(k)]
        for t in threads:
            t.start()
        holding.wait(timeout=10)
        assert (used(registry), idle(registry)) == pool_state(engine)
        assert used(registry) == k
        release.set()
        for t in threads:
            t.join()
        checkouts += k
        assert (used(registry), idle(registry)) == pool_state(engine)
        assert used(registry) == 0

    # Churn: more threads than connections, so checkouts wait; sample gauges meanwhile.
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(25):
                with engine.connect() as conn:
                    conn.execute(sa.text("select pg_sleep(0.001)"))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(12)]
    for t in threads:
        t.start()
    peak_pending = 0.0
    while any(t.is_alive() for t in threads):
        in_use, kept = used(registry) or 0.0, idle(registry) or 0.0
        assert 0 <= in_use <= 6
        assert 0 <= kept <= 3
        peak_pending = max(peak_pending, sample(registry, "pool_pending_requests") or 0.0)
        time.sleep(0.001)
    for t in threads:
        t.join()
    checkouts += 12 * 25
    assert not errors
    assert (used(registry), idle(registry)) == pool_state(engine) == (0, 3)
    # Waits inside the pool are not measured (no public hook at the start of a checkout).
    assert waits(registry) == 0
    assert sample(registry, "pool_pending_requests") == 0
    assert peak_pending == 0
    assert sample(registry, "pool_use_seconds_count") == checkouts
    created = sample(registry, "pool_connections_created_total")
    assert created is not None
    assert created >= 6
    assert sample(registry, "pool_connect_seconds_count") == created
    assert created - (sample(registry, "pool_connections_closed_total") or 0) == 3


@pytest.mark.postgres
@pytest.mark.anyio
async def test_gauges_match_the_async_adapted_pool_during_concurrent_checkouts_on_asyncpg(
    registry: CollectorRegistry,
) -> None:
    engine = asyncpg_engine(pool_size=2, max_overflow=2, pool_timeout=10)
    try:
        instrument_pool(engine, Metrics.on(registry), DB)  # an AsyncEngine: its sync_engine
        sync = engine.sync_engine
        assert type(sync.pool).__name__ == "AsyncAdaptedQueuePool"

        async def hold(k: int, holding: list[int], held: asyncio.Event, go: asyncio.Event) -> None:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1"))
                holding.append(1)
                if len(holding) == k:
                    held.set()
                await go.wait()

        for k in (1, 2, 4):
            holding: list[int] = []
            held, release = asyncio.Event(), asyncio.Event()
            tasks = [asyncio.create_task(hold(k, holding, held, release)) for _ in range(k)]
            await asyncio.wait_for(held.wait(), 10)
            assert (used(registry), idle(registry)) == pool_state(sync)
            assert used(registry) == k
            release.set()
            await asyncio.gather(*tasks)
            assert (used(registry), idle(registry)) == pool_state(sync)
            assert used(registry) == 0
        assert sample(registry, "pool_use_seconds_count") == 1 + 2 + 4
        assert sample(registry, "pool_connections_max") == 4
    finally:
        await engine.dispose()


@dataclass
class Gate:
    """Holds ``expected`` requests after their first write, until ``release`` is set."""

    expected: int
    holding: int = 0
    all_held: anyio.Event = field(default_factory=anyio.Event)
    release: anyio.Event = field(default_factory=anyio.Event)


def gated_app(
    backend: Backend, gates: list[Gate], registry: CollectorRegistry
) -> DBSessionMiddleware:
    """Each request inserts a row (its session now holds a connection), waits at the latest
    gate, then answers 201 (committed by the middleware)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        gate = gates[-1]
        await backend.insert(scope["state"]["db"], scope["path"].strip("/"))
        gate.holding += 1
        if gate.holding == gate.expected:
            gate.all_held.set()
        await gate.release.wait()
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body"})

    return DBSessionMiddleware(app, engine=backend.engine, name=DB, registry=registry)


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["pg-sync", "pg-async"])
async def test_used_connections_match_the_pool_while_concurrent_requests_hold_sessions_on_postgres(
    kind: str, registry: CollectorRegistry, tmp_path: Path
) -> None:
    async with backend_for(kind, tmp_path) as backend:  # SQLAlchemy's default pool: 5 + 10
        gates: list[Gate] = []
        app = gated_app(backend, gates, registry)
        sync = backend.sync_engine
        assert (used(registry), idle(registry)) == (0, 0)
        sent: list[Exchange] = []

        async def one(path: str) -> None:
            sent.append(await request(app, path, method="POST"))

        for k in (1, 8, 15):
            gate = Gate(k)
            gates.append(gate)
            async with anyio.create_task_group() as tg:
                for i in range(k):
                    tg.start_soon(one, f"/held-{k}-{i}")
                with anyio.fail_after(10):
                    await gate.all_held.wait()
                # k requests are in flight, each session holding its connection.
                assert used(registry) == backend.checkedout() == k
                assert (used(registry), idle(registry)) == pool_state(sync)
                gate.release.set()
            assert used(registry) == backend.checkedout() == 0
            assert (used(registry), idle(registry)) == pool_state(sync)

        assert [ex.status for ex in sent] == [201] * (1 + 8 + 15)
        assert len(backend.names()) == 1 + 8 + 15  # every held request committed its row
        assert sample(registry, "pool_connections_max") == 15
        assert sample(registry, "pool_pending_requests") == 0


@pytest.mark.anyio
async def test_wait_buckets_reach_the_pool_timeout_of_the_default_configuration(
    backend: Backend, registry: CollectorRegistry
) -> None:
    DBSessionMiddleware(FastAPI(), engine=backend.engine, registry=registry)
    timeout = float(backend.sync_engine.pool.timeout())  # type: ignore[attr-defined]
    assert timeout == 30.0  # SQLAlchemy's default pool_timeout: the tests change nothing
    assert registry.get_sample_value("db_pool_timeout_seconds", {"db": "default"}) == timeout
    (family,) = [f for f in registry.collect() if f.name == "db_pool_wait_seconds"]
    bounds = [
        float(s.labels["le"])
        for s in family.samples
        if s.name == "db_pool_wait_seconds_bucket" and s.labels["db"] == "default"
    ]
    finite = [b for b in bounds if math.isfinite(b)]
    assert bounds[-1] == math.inf
    # A checkout that waits until it times out lands in a finite bucket, so quantiles of
    # waits near the timeout stay measurable instead of collapsing into +Inf.
    assert max(finite) >= timeout
    assert sorted(finite) == finite


# ------------------------------------------------------------------ waits and timeouts


@pytest.mark.anyio
@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("pg-sync", marks=pytest.mark.postgres),
        pytest.param("pg-async", marks=pytest.mark.postgres),
    ],
)
async def test_a_pool_timeout_outside_requests_reaches_the_caller_unchanged(
    kind: str, engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    # SQLAlchemy has no public hook at the start of a checkout: a checkout that waits in the
    # pool itself is not timed, and the instruments must not get in its way either.
    limits: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    async_engine = asyncpg_engine(**limits) if kind == "pg-async" else None
    if async_engine is not None:
        engine = async_engine.sync_engine
    else:
        engine = engines("sqlite" if kind == "sqlite" else "pg", **limits)
    instrument_pool(async_engine or engine, Metrics.on(registry), DB)
    try:
        if async_engine is not None:
            async with async_engine.connect():
                with pytest.raises(sa.exc.TimeoutError) as raised:
                    async with async_engine.connect():
                        pass
        else:
            with engine.connect(), pytest.raises(sa.exc.TimeoutError) as raised:
                engine.connect()
    finally:
        if async_engine is not None:
            await async_engine.dispose()

    assert type(raised.value) is sa.exc.TimeoutError
    assert raised.value.code == "3o7r"
    assert str(raised.value).startswith("QueuePool limit of size 1 overflow 0 reached")
    assert raised.traceback[-1].name == "_do_get"  # SQLAlchemy's own exception, not a copy
    assert sample(registry, "pool_use_seconds_count") == 1
    assert sample(registry, "pool_pending_requests") == 0


@pytest.mark.anyio
async def test_a_request_whose_checkout_times_out_in_the_pool_is_counted_observed_and_logged(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    # An async engine has no admission: the request's checkout waits in the pool itself, and
    # the middleware sees SQLAlchemy's timeout when it answers 503.
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'timeout.db'}",
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.2,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await scope["state"]["db"].execute(sa.text("select 1"))
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    middleware = DBSessionMiddleware(app, engine=engine, registry=registry)
    try:
        with capture_logs() as logs:
            async with engine.connect() as held:
                await held.execute(sa.text("select 1"))
                ex = await request(middleware)
        assert ex.status == 503
        assert (await request(middleware)).status == 200  # served once the pool has room
    finally:
        await engine.dispose()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"db_{name}", {"db": "default", **labels})

    assert value("pool_timeouts_total") == 1
    # the timed-out request's wait, observed as the pool's timeout, and the second request's
    assert value("pool_wait_seconds_count") == 2
    assert (value("pool_wait_seconds_bucket", le="0.1") or 0) == 1
    assert (value("pool_wait_seconds_sum") or 0) >= 0.2
    assert value("pool_pending_requests") == 0
    (entry,) = [e for e in logs if e["event"] == "db_pool.timeout"]
    assert entry == {
        "event": "db_pool.timeout",
        "log_level": "error",
        "db": "default",
        "pool_size": 1,
        "checked_out": 1,
        "overflow": 0,
        "pending": 0,
        "waited_s": 0.2,
        "timeout_s": 0.2,
    }


# -------------------------------------------------------------------- connection churn


def test_created_closed_and_invalidated_connections_are_counted(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines(pool_size=1, max_overflow=2)
    instrument_pool(engine, Metrics.on(registry), DB)
    for name in ("pool_connections_created_total", "pool_connections_closed_total"):
        assert sample(registry, name) == 0
    assert sample(registry, "pool_connections_invalidated_total", kind="hard") == 0
    assert sample(registry, "pool_connections_invalidated_total", kind="soft") == 0

    a, b = engine.raw_connection(), engine.raw_connection()
    assert sample(registry, "pool_connections_created_total") == 2
    assert sample(registry, "pool_connect_seconds_count") == 2
    b.close()
    a.close()  # the idle queue (pool_size 1) is full: closed on checkin
    assert sample(registry, "pool_connections_closed_total") == 1

    hard = engine.raw_connection()
    hard.invalidate()  # closes the DBAPI connection now
    hard.close()
    assert sample(registry, "pool_connections_invalidated_total", kind="hard") == 1
    assert sample(registry, "pool_connections_closed_total") == 2

    soft = engine.raw_connection()  # reconnects the invalidated record
    assert sample(registry, "pool_connections_created_total") == 3
    soft.invalidate(soft=True)  # replaced at its next checkout
    soft.close()
    assert sample(registry, "pool_connections_invalidated_total", kind="soft") == 1
    time.sleep(0.02)  # the soft invalidation compares wall-clock timestamps
    engine.raw_connection().close()
    assert sample(registry, "pool_connections_created_total") == 4
    assert sample(registry, "pool_connections_closed_total") == 3

    detached = engine.raw_connection()
    detached.detach()
    detached.close()
    assert sample(registry, "pool_connections_closed_total") == 4
    assert sample(registry, "pool_connect_seconds_count") == sample(
        registry, "pool_connections_created_total"
    )


def test_use_time_is_observed_from_checkout_to_checkin(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines()
    instrument_pool(engine, Metrics.on(registry), DB)
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        time.sleep(0.06)
        assert sample(registry, "pool_use_seconds_count") == 0
    with engine.connect():
        pass
    assert sample(registry, "pool_use_seconds_count") == 2
    assert sample(registry, "pool_use_seconds_bucket", le="0.05") == 1
    assert (sample(registry, "pool_use_seconds_sum") or 0) >= 0.06


# ------------------------------------------------------------ dispose, idempotence, pools


def test_instrumentation_survives_engine_dispose(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines(pool_size=1, max_overflow=0, pool_timeout=0.1)
    instrument_pool(engine, Metrics.on(registry), DB)
    engine.connect().close()
    old = engine.pool
    engine.dispose()
    assert engine.pool is not old
    assert sample(registry, "pool_connections_closed_total") == 1  # the idle one

    with engine.connect():
        assert (used(registry), idle(registry)) == pool_state(engine) == (1, 0)
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    assert (used(registry), idle(registry)) == pool_state(engine) == (0, 1)
    assert sample(registry, "pool_connections_created_total") == 2
    assert sample(registry, "pool_use_seconds_count") == 2

    engine.dispose(close=False)
    engine.connect().close()
    assert sample(registry, "pool_use_seconds_count") == 3


@pytest.mark.postgres
@pytest.mark.anyio
async def test_instrumentation_survives_async_engine_dispose_on_asyncpg(
    registry: CollectorRegistry,
) -> None:
    engine = asyncpg_engine(pool_size=1, max_overflow=0, pool_timeout=0.1)
    try:
        instrument_pool(engine.sync_engine, Metrics.on(registry), DB)
        async with engine.connect() as conn:
            await conn.execute(sa.text("select 1"))
        await engine.dispose()
        async with engine.connect() as conn:
            await conn.execute(sa.text("select 1"))
            assert (used(registry), idle(registry)) == pool_state(engine.sync_engine) == (1, 0)
            with pytest.raises(sa.exc.TimeoutError):
                async with engine.connect():
                    pass
        assert sample(registry, "pool_use_seconds_count") == 2
        assert sample(registry, "pool_connections_closed_total") == 1
    finally:
        await engine.dispose()


def test_installing_twice_returns_the_same_instruments_and_adds_nothing(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines()
    metrics = Metrics.on(registry)
    first = instrument_pool(engine, metrics, DB)
    listeners = listener_counts(engine)
    assert instrument_pool(engine, metrics, DB) is first
    assert instrument_pool(engine, Metrics.on(registry), DB) is first
    assert listener_counts(engine) == listeners

    engine.dispose()
    assert instrument_pool(engine, metrics, DB) is first
    assert listener_counts(engine) == listeners
    engine.connect().close()
    assert sample(registry, "pool_connections_created_total") == 1
    assert sample(registry, "pool_use_seconds_count") == 1


def test_each_db_label_and_registry_gets_its_own_instruments(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines()
    other_registry = CollectorRegistry()
    main = instrument_pool(engine, Metrics.on(registry), DB)
    replica = instrument_pool(engine, Metrics.on(registry), "replica")
    elsewhere = instrument_pool(engine, Metrics.on(other_registry), DB)
    assert len({id(main), id(replica), id(elsewhere)}) == 3
    with engine.connect():
        for reg, db in ((registry, DB), (registry, "replica"), (other_registry, DB)):
            labels = {"db": db, "state": "used"}
            assert reg.get_sample_value("db_pool_connections", labels) == 1
            assert reg.get_sample_value("db_pool_connections_created_total", {"db": db}) == 1
    for reg, db in ((registry, DB), (registry, "replica"), (other_registry, DB)):
        assert reg.get_sample_value("db_pool_use_seconds_count", {"db": db}) == 1


@pytest.mark.parametrize("poolclass", [NullPool, StaticPool, SingletonThreadPool, AssertionPool])
def test_pools_without_state_export_no_state_gauges_and_scrape_without_errors(
    engines: Callable[..., Engine], registry: CollectorRegistry, poolclass: type[Pool]
) -> None:
    engine = engines(poolclass=poolclass)
    instruments = instrument_pool(engine, Metrics.on(registry), DB)
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        text = generate_latest(registry).decode()
    engine.connect().close()
    instruments.refresh()
    generate_latest(registry)

    assert "db_pool_connections{" not in text
    for gauge in ("pool_connections_max", "pool_timeout_seconds"):
        assert sample(registry, gauge) is None
    assert sample(registry, "pool_pending_requests") == 0
    assert sample(registry, "pool_use_seconds_count") == 2
    assert sample(registry, "pool_connections_created_total") == (2 if poolclass is NullPool else 1)


# ------------------------------------------------------------------ multiprocess mode


def test_in_multiprocess_mode_events_write_the_gauges_and_refresh_resynchronises(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    engine = engines(pool_size=2, max_overflow=1, pool_timeout=4)
    instruments = instrument_pool(engine, Metrics.on(registry), DB, multiprocess=True)
    assert instruments.multiprocess
    assert (used(registry), idle(registry)) == (0, 0)
    assert sample(registry, "pool_connections_max") == 3
    assert sample(registry, "pool_timeout_seconds") == 4

    a, b, c = engine.connect(), engine.connect(), engine.connect()
    assert (used(registry), idle(registry)) == pool_state(engine) == (3, 0)
    c.close()
    assert (used(registry), idle(registry)) == pool_state(engine) == (2, 1)
    b.close()
    assert (used(registry), idle(registry)) == pool_state(engine) == (1, 2)
    a.close()  # the idle queue is full: closed
    assert (used(registry), idle(registry)) == pool_state(engine) == (0, 2)

    engine.pool.dispose()  # no event: the written gauges lag until the sweep
    assert pool_state(engine) == (0, 0)
    assert idle(registry) == 2
    instruments.refresh()
    assert (used(registry), idle(registry)) == (0, 0)


def test_multiprocess_mode_is_detected_and_its_files_hold_the_pool_metrics(
    tmp_path: Path,
) -> None:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    script = textwrap.dedent(
        """
        import json, sys
        import sqlalchemy as sa
        from prometheus_client import CollectorRegistry, multiprocess
        from sessionscope._metrics import Metrics
        from sessionscope._metrics import multiprocess_mode
        from sessionscope._pool import instrument_pool

        engine = sa.create_engine(
            "sqlite:///" + sys.argv[1], pool_size=2, max_overflow=1, pool_timeout=0.1
        )
        instruments = instrument_pool(engine, Metrics.on(CollectorRegistry()), "main")
        held = [engine.connect(), engine.connect(), engine.connect()]
        held.pop().close()
        instruments.refresh()
        exposition = CollectorRegistry()
        multiprocess.MultiProcessCollector(exposition)
        def value(name, **labels):
            return exposition.get_sample_value(name, {"db": "main", **labels})
        print(json.dumps({
            "detected": multiprocess_mode() and instruments.multiprocess,
            "used": value("db_pool_connections", state="used"),
            "idle": value("db_pool_connections", state="idle"),
            "max": value("db_pool_connections_max"),
            "uses": value("db_pool_use_seconds_count"),
        }))
        for conn in held:
            conn.close()
        engine.dispose()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "mp.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "detected": True,
        "used": 2.0,
        "idle": 1.0,
        "max": 3.0,
        "uses": 1.0,
    }


# ---------------------------------------------------------------------------- exposition


def test_the_exposition_passes_promtool_check_metrics(
    engines: Callable[..., Engine], registry: CollectorRegistry
) -> None:
    tool = promtool()
    metrics = Metrics.on(registry)
    engine = engines(pool_size=1, max_overflow=0, pool_timeout=0.05)
    instrument_pool(engine, metrics, DB)
    instrument_pool(engines(poolclass=NullPool), metrics, "nullpool")
    instrument_pool(engines(pool_size=0), metrics, "unbounded")
    with engine.connect() as conn:
        conn.connection.invalidate(soft=True)
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()

    exposition = generate_latest(registry)
    assert b'db_pool_connections_max{db="unbounded"} +Inf' in exposition
    checked = subprocess.run(
        [tool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=60,
        check=False,
    )
    report = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0, report
    assert report.strip() == "", report


def test_instruments_hold_the_engine_weakly(registry: CollectorRegistry, tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'weak.db'}")
    instruments: PoolInstruments = instrument_pool(engine, Metrics.on(registry), DB)
    assert instruments.engine is engine
    engine.dispose()
    del engine
    gc.collect()
    assert instruments.engine is None
    instruments.refresh()  # a no-op, not an error
    assert math.isnan(used(registry) or 0.0)
