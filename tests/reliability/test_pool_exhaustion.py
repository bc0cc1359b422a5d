"""Pool exhaustion: callers beyond the pool's capacity are told ``503`` quickly, not queued.

A pool of 2 connections (no overflow, 0.5 s checkout timeout) meets 50 concurrent requests
that each hold their connection for 2 s. The two that get a connection succeed; everyone else
gets a complete ``503`` with ``Retry-After`` as soon as their checkout times out (long before a
connection frees up), nothing they wrote is committed, and the application serves normally
right afterwards.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs

from ..support import items
from .apps import write_app
from .helpers import (
    Client,
    checkedout,
    dispose,
    pg_engine,
    poll_until,
    sample,
    wait_until_no_idle_in_transaction,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

POOL_SIZE = 2
POOL_TIMEOUT = 0.5
CALLERS = 50
HOLD = 2.0


async def burst(client: Client, marker: str) -> None:
    await client.call(f"/write/{marker}", method="POST", query=f"hold={HOLD}", marker=marker)


@pytest.mark.parametrize("kind", ["pg-sync", "pg-async"])
async def test_callers_beyond_pool_capacity_get_503_with_retry_after_within_the_timeout(
    kind: str, pg_url: str, check: Engine, app_name: str
) -> None:
    engine = pg_engine(
        pg_url,
        async_=kind == "pg-async",
        application_name=app_name,
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
    )
    registry = CollectorRegistry()
    client = Client(write_app(engine, registry=registry))
    pending_seen = 0.0
    try:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                for i in range(CALLERS):
                    tg.start_soon(burst, client, f"burst-{i:02d}")
                # bounded poll of a gauge while the burst is on (a gauge has no event)
                with anyio.move_on_after(HOLD / 2):
                    while pending_seen < CALLERS - POOL_SIZE - 20:
                        pending_seen = max(
                            pending_seen, sample(registry, "db_pool_pending_requests") or 0
                        )
                        await anyio.sleep(0.005)
            outcomes = list(client.outcomes)
            statuses = Counter(o.status for o in outcomes)
            assert statuses == {201: POOL_SIZE, 503: CALLERS - POOL_SIZE}
            for outcome in outcomes:
                outcome.exchange.assert_well_formed()
                if outcome.status == 503:
                    assert outcome.error is None
                    assert outcome.headers["retry-after"] == "1"
                    assert b"pool is exhausted" in outcome.body
                    # told at its checkout timeout, not after a connection freed up; sync
                    # callers may first queue for a worker thread for one more timeout
                    assert POOL_TIMEOUT * 0.9 <= outcome.elapsed < 2 * POOL_TIMEOUT + 0.5
            assert (
                len([e for e in logs if e["event"] == "db_session.pool_timeout"])
                == CALLERS - POOL_SIZE
            )

            # the application serves normally afterwards
            for i in range(5):
                after = await client.call(f"/write/after-{i}", method="POST")
                assert after.status == 201
        with check.connect() as conn:
            names = set(conn.execute(sa.select(items.c.name)).scalars())
        succeeded = {o.marker for o in outcomes if o.status == 201}
        # exactly the acknowledged writes are in the database
        assert names == succeeded | {f"after-{i}" for i in range(5)}
        assert checkedout(engine) == 0
        assert await wait_until_no_idle_in_transaction(check, app_name) == 0
        assert sample(registry, "db_sessions_open") == 0
        assert sample(registry, "db_pool_timeouts_total") == CALLERS - POOL_SIZE
        # sync: waiting for an admission slot; async: inside the pool, from the session's
        # first transaction to its connection
        assert pending_seen >= CALLERS - POOL_SIZE - 20  # sync callers: 40 worker threads
        assert sample(registry, "db_pool_pending_requests") == 0
        assert sample(registry, "db_pool_connections", state="used") == 0
        # every timed-out caller's wait; async: every caller's (sync: a request admitted at
        # once observes no wait)
        waited = CALLERS - POOL_SIZE if kind == "pg-sync" else CALLERS
        assert (sample(registry, "db_pool_wait_seconds_count") or 0) >= waited
    finally:
        await dispose(engine)


@pytest.mark.parametrize("kind", ["pg-sync", "pg-async"])
async def test_a_request_waiting_for_the_only_connection_is_pending_and_its_wait_observed(
    kind: str, pg_url: str, app_name: str
) -> None:
    timeout = 1.0
    engine = pg_engine(
        pg_url,
        async_=kind == "pg-async",
        application_name=app_name,
        pool_size=1,
        max_overflow=0,
        pool_timeout=timeout,
    )
    registry = CollectorRegistry()
    client = Client(write_app(engine, registry=registry))

    def waits() -> float:
        return sample(registry, "db_pool_wait_seconds_count") or 0

    async def pending_while(done: anyio.Event) -> float:
        """Seconds from the first to the last poll that saw one request pending."""
        first = last = None
        while not done.is_set():
            if sample(registry, "db_pool_pending_requests") == 1:
                last = time.perf_counter()
                first = first or last
            await anyio.sleep(0.005)
        assert first is not None, "never seen pending"
        assert last is not None
        return last - first

    async def held_then(query: str, marker: str, then: str) -> float:
        done = anyio.Event()
        seen = 0.0

        async def watch() -> None:
            nonlocal seen
            seen = await pending_while(done)

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(client.call, f"/write/{marker}", method="POST", query=query))
            assert await poll_until(lambda: checkedout(engine) == 1, within=5)
            tg.start_soon(watch)
            await client.call(f"/write/{then}", method="POST")
            done.set()
        return seen

    try:
        before = waits()
        # the second request waits for the first's connection, and gets it
        seen = await held_then("hold=0.5", f"{app_name}-holder", f"{app_name}-waiter")
        assert sorted(o.status for o in client.outcomes) == [201, 201]
        assert sample(registry, "db_pool_pending_requests") == 0
        if kind == "pg-sync":
            assert waits() == before + 1  # the admission's wait
        else:
            assert waits() == before + 2  # the holder's (no wait) and the waiter's
        assert (sample(registry, "db_pool_wait_seconds_sum") or 0) >= seen

        # a third one times out: counted, its wait observed
        before = waits()
        await held_then(f"hold={2 * timeout}", f"{app_name}-holder-2", f"{app_name}-timed-out")
        assert sorted(o.status for o in client.outcomes[2:]) == [201, 503]
        assert sample(registry, "db_pool_timeouts_total") == 1
        assert waits() >= before + 1
        assert sample(registry, "db_pool_pending_requests") == 0
        assert checkedout(engine) == 0
    finally:
        await dispose(engine)
