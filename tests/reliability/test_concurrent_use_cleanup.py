"""Two tasks on the request session: a clear error, and nothing left behind (PostgreSQL).

``asyncio.gather`` does not wait for the other task when one fails: the middleware closes the
session while the other task may still be using it. The connection must still come back to
the pool (or be invalidated), with no backend left ``idle in transaction`` holding its locks,
so a small pool keeps serving.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from sessionscope import ConcurrentSessionUseError, DBSessionMiddleware

from ..support import items
from .helpers import Client, checkedout, dispose, pg_engine, poll_until, wait_until_quiet

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

KINDS = ["pg-sync", "pg-async"]
SLEEP = sa.text("SELECT pg_sleep(0.2)")


def gather_app() -> Any:
    """``/gather`` runs two statements at once on the request session as its first ones,
    ``/warm-gather`` after one of its own; ``/`` writes one row and answers 201."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        if scope["path"] == "/warm-gather":  # the session holds its connection already
            statement = sa.select(sa.func.count()).select_from(items)
            if isinstance(session, AsyncSession):
                await session.execute(statement)
            else:
                await run_in_threadpool(session.execute, statement)
        if scope["path"] in ("/gather", "/warm-gather"):
            if isinstance(session, AsyncSession):
                await asyncio.gather(session.execute(SLEEP), session.execute(SLEEP))
            else:
                await asyncio.gather(
                    run_in_threadpool(session.execute, SLEEP),
                    run_in_threadpool(session.execute, SLEEP),
                )
        else:
            statement = items.insert().values(name=scope["query_string"].decode())
            if isinstance(session, AsyncSession):
                await session.execute(statement)
            else:
                await run_in_threadpool(session.execute, statement)
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytest.mark.parametrize("path", ["/gather", "/warm-gather"])
@pytest.mark.parametrize("kind", KINDS)
async def test_two_tasks_on_a_fresh_request_session_leave_no_connection_or_transaction_behind(
    kind: str, path: str, pg_url: str, check: Engine, app_name: str
) -> None:
    engine = pg_engine(
        pg_url,
        async_=kind == "pg-async",
        application_name=app_name,
        pool_size=2,
        max_overflow=0,
        pool_timeout=2,
    )
    client = Client(DBSessionMiddleware(gather_app(), engine=engine, registry=CollectorRegistry()))
    try:
        for _ in range(2):  # as many as the pool has connections
            outcome = await client.call(path)
            assert isinstance(outcome.error, ConcurrentSessionUseError), repr(outcome.error)
            assert "gather_with_sessions" in str(outcome.error)
        # The other task of each request may still be running: bounded wait for it to end.
        assert await poll_until(lambda: checkedout(engine) == 0, within=5)
        assert await wait_until_quiet(check, app_name) == 0  # no backend idle in transaction
        for i in range(3):  # the pool serves on
            outcome = await client.call("/", method="POST", query=f"after-{i}")
            assert outcome.error is None, outcome.error
            assert outcome.status == 201
        with check.connect() as conn:
            assert set(conn.execute(sa.select(items.c.name)).scalars()) == {
                "after-0",
                "after-1",
                "after-2",
            }
        assert checkedout(engine) == 0
    finally:
        with anyio.CancelScope(shield=True):
            await dispose(engine)
