"""Network faults between the application and PostgreSQL, injected by a TCP proxy.

While a sync (psycopg) or async (asyncpg) application serves concurrent writes, the proxy
resets every open connection, refuses new ones, stalls traffic mid-query and adds latency.
Afterwards the client-side record is compared with the database: every request got an answer
within its deadline, every ``2xx`` write is there, no ``4xx``/``5xx`` write is, and the same
application (no restart) serves normally once the network heals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware

from ..support import items
from .apps import REJECT_PREFIX, write_app
from .fault_proxy import FaultProxy
from .helpers import (
    Client,
    checkedout,
    dispose,
    pg_engine,
    sample,
    wait_until_no_idle_in_transaction,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KINDS = ["pg-sync", "pg-async"]
REQUESTS = 400
CONCURRENCY = 12
HOLD = 0.01
POOL_TIMEOUT = 3.0
CONNECT_TIMEOUT = 2.0
STALL = 0.5
REQUEST_DEADLINE = 10.0
"""No request may take longer: connect + pool timeouts + one stall, with a wide margin."""
RECOVERY_REQUESTS = 20
"""Sent one at a time once the network has healed (no restart in between)."""


def committed_names(check: Engine) -> set[str]:
    with check.connect() as conn:
        return set(conn.execute(sa.select(items.c.name)).scalars())


@dataclass
class FaultLog:
    cuts: int = 0
    connections_cut: int = 0
    refusals: int = 0
    stalls: int = 0
    latency_windows: int = 0

    @property
    def injected(self) -> int:
        return self.cuts + self.refusals + self.stalls + self.latency_windows


async def run_faults(proxy: FaultProxy, milestones: list[anyio.Event], faults: FaultLog) -> None:
    """The fault timeline, driven by how many requests have completed."""

    def cut() -> None:
        faults.cuts += 1
        faults.connections_cut += proxy.cut()

    await milestones[0].wait()  # 15 %: every open connection reset
    cut()
    await milestones[1].wait()  # 30 %: reset, and the server becomes unreachable
    cut()
    proxy.refuse()
    faults.refusals += 1
    await milestones[2].wait()  # 40 %: reachable again
    proxy.heal()
    await milestones[3].wait()  # 55 %: traffic stalls mid-query, then the peer resets
    proxy.stall()
    faults.stalls += 1
    await anyio.sleep(STALL)  # a partition lasts a while: nothing to await but time
    cut()
    proxy.heal()
    await milestones[4].wait()  # 70 %: slow network
    proxy.add_latency(0.02)
    faults.latency_windows += 1
    await milestones[5].wait()  # 85 %: fast again, then one more reset
    proxy.heal()
    cut()


async def drive(client: Client, markers: list[str], milestones: dict[int, anyio.Event]) -> None:
    """Send every marker once, ``CONCURRENCY`` at a time. A request still running after three
    deadlines is abandoned: it records no outcome, which the caller's check turns into a
    failure (the run itself never blocks)."""
    queue = iter(markers)
    done = 0

    async def worker() -> None:
        nonlocal done
        for marker in queue:
            with anyio.move_on_after(REQUEST_DEADLINE * 3):
                await client.call(
                    f"/write/{marker}",
                    method="POST",
                    headers=[(b"x-request-id", marker.encode())],
                    marker=marker,
                )
            done += 1
            if done in milestones:
                milestones[done].set()

    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)


@pytest.mark.parametrize("recovery_by", ["pre_ping", "invalidation"])
@pytest.mark.parametrize("kind", KINDS)
async def test_connections_cut_under_load_lose_no_acknowledged_write_and_recover_alone(
    kind: str, recovery_by: str, pg_url: str, check: Engine, proxy: FaultProxy, app_name: str
) -> None:
    """With ``pool_pre_ping`` a dead pooled connection is replaced before use; without it,
    SQLAlchemy invalidates the whole pool at the first disconnect error, so at most one
    request after the network heals may still meet a dead connection."""
    engine = pg_engine(
        pg_url,
        async_=kind == "pg-async",
        application_name=app_name,
        host=proxy.host,
        port=proxy.port,
        connect_timeout=CONNECT_TIMEOUT,
        pool_size=4,
        max_overflow=4,
        pool_timeout=POOL_TIMEOUT,
        pool_pre_ping=recovery_by == "pre_ping",
    )
    registry = CollectorRegistry()
    app = write_app(engine, hold=HOLD, registry=registry)
    client = Client(app)
    markers = [f"{REJECT_PREFIX}{i:05d}" if i % 5 == 0 else f"w-{i:05d}" for i in range(REQUESTS)]
    marks = [int(REQUESTS * f) for f in (0.15, 0.30, 0.40, 0.55, 0.70, 0.85)]
    milestones = {m: anyio.Event() for m in marks}
    faults = FaultLog()
    try:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_faults, proxy, [milestones[m] for m in marks], faults)
                await drive(client, markers, milestones)
            outcomes = list(client.outcomes)
            # every request of the load got an answer, before any other request is sent: an
            # abandoned (hung) one has no outcome, and nothing may stand in for it
            answered = Counter(o.marker for o in outcomes)
            unanswered = sorted(set(markers) - set(answered))
            assert not unanswered, f"{len(unanswered)} requests hung: {unanswered[:10]}"
            assert answered == Counter(markers)
            proxy.heal()
            # the same application, no restart: it serves again once the network is back
            recovery = [f"after-{i:03d}" for i in range(RECOVERY_REQUESTS)]
            for marker in recovery:
                await client.call(f"/write/{marker}", method="POST", marker=marker)
        after = client.outcomes[len(outcomes) :]
        assert [o.marker for o in after] == recovery

        # every answer is complete and came within its deadline
        for outcome in outcomes:
            outcome.exchange.assert_well_formed()
            assert outcome.elapsed < REQUEST_DEADLINE, (outcome.marker, outcome.elapsed)
        statuses = Counter(o.status for o in outcomes)
        assert set(statuses) <= {201, 409, 500, 503}, statuses
        assert statuses[500] + statuses[503] > 0, "the faults never reached a request"
        assert statuses[201] > 0

        # the database agrees with what the clients were told
        in_db = committed_names(check)
        in_doubt = in_doubt_commits(logs)
        acknowledged = {o.marker for o in outcomes if o.status == 201}
        refused = {o.marker for o in outcomes if o.status != 201}
        assert acknowledged <= in_db, sorted(acknowledged - in_db)[:10]
        assert not {m for m in refused if m.startswith(REJECT_PREFIX)} & in_db
        assert (refused & in_db) <= in_doubt, sorted((refused & in_db) - in_doubt)
        stale = 0 if recovery_by == "pre_ping" else 1
        assert len([o for o in after if o.status != 201]) <= stale, [o.status for o in after]
        assert all(o.status == 201 for o in after[stale:])
        assert {o.marker for o in after if o.status == 201} <= in_db

        # nothing leaked: pool, server sessions, metrics
        assert checkedout(engine) == 0
        assert await wait_until_no_idle_in_transaction(check, app_name) == 0
        assert sample(registry, "db_sessions_open") == 0
        assert sample(registry, "db_pool_connections", state="used") == 0
        invalidated = sum(
            sample(registry, "db_pool_connections_invalidated_total", kind=k) or 0
            for k in ("hard", "soft")
        )
        assert invalidated > 0  # the dead connections were noticed and replaced
        assert faults.connections_cut > 0
        record(
            f"{kind}/{recovery_by}",
            requests=len(client.outcomes),
            faults=faults.injected,
            connections_cut=faults.connections_cut,
            writes_checked=len(outcomes) + len(after),
            acknowledged=len(acknowledged),
            rejects_checked=len([m for m in markers if m.startswith(REJECT_PREFIX)]),
            rejected_409=statuses[409],
            failed=statuses[500] + statuses[503],
            in_doubt=len(refused & in_db),
        )
    finally:
        await dispose(engine)


def in_doubt_commits(logs: list[MutableMapping[str, Any]]) -> set[str]:
    """Requests whose COMMIT was sent but whose answer was lost with the connection.

    The server may have committed; the client was told 500. No protocol without two-phase
    commit can avoid this window; it is reported, and bounded to commit failures.
    """
    return {
        str(e["request_id"])
        for e in logs
        if e["event"] == "db_session.commit_failed" and e.get("error_type") != "IntegrityError"
    }


def record(kind: str, **figures: int) -> None:
    """Print the run's figures (``pytest -s``): the README's Guarantees quote them."""
    print(f"\n[figures] {kind}: {figures}")


@pytest.mark.parametrize("kind", KINDS)
async def test_database_unreachable_at_commit_time_answers_500_never_2xx(
    kind: str, pg_url: str, check: Engine, proxy: FaultProxy, app_name: str
) -> None:
    engine = pg_engine(
        pg_url,
        async_=kind == "pg-async",
        application_name=app_name,
        host=proxy.host,
        port=proxy.port,
        pool_size=2,
        pool_pre_ping=True,
    )

    async def cut_before_commit(request: Request) -> Response:
        session = request.state.db
        stmt = items.insert().values(name=request.path_params["marker"])
        if isinstance(engine, AsyncEngine):
            await session.execute(stmt)
        else:
            await anyio.to_thread.run_sync(session.execute, stmt)
        if request.query_params.get("fault") == "1":
            proxy.cut()
            proxy.refuse()
        return JSONResponse({"ok": True}, status_code=201)

    app = Starlette(
        routes=[Route("/write/{marker}", cut_before_commit, methods=["POST"])],
        middleware=[Middleware(DBSessionMiddleware, engine=engine, registry=CollectorRegistry())],
    )
    client = Client(app)
    try:
        with capture_logs() as logs:
            lost = await client.call("/write/lost", method="POST", query="fault=1")
        assert lost.status == 500
        lost.exchange.assert_well_formed()
        assert lost.body == b'{"detail": "Internal Server Error"}'
        assert lost.error is None  # the middleware answered; nothing escaped to the server
        assert [e["event"] for e in logs if e["event"] == "db_session.commit_failed"] == [
            "db_session.commit_failed"
        ]
        assert checkedout(engine) == 0
        proxy.heal()
        kept = await client.call("/write/kept", method="POST")
        assert kept.status == 201
        assert committed_names(check) == {"kept"}
        assert checkedout(engine) == 0
        assert await wait_until_no_idle_in_transaction(check, app_name) == 0
    finally:
        await dispose(engine)
