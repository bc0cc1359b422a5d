"""session_scope(): commit on success, rollback on exception, always closed."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from sessionscope import ConfigurationError, session_scope

from .support import Backend, items, make_backend

pytestmark = pytest.mark.anyio


async def test_commits_on_success(backend: Backend) -> None:
    if backend.is_async:
        async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
            await session.execute(items.insert().values(name="ok"))
    else:
        with session_scope(backend.engine) as session:  # type: ignore[arg-type]
            session.execute(items.insert().values(name="ok"))
    assert backend.names() == ["ok"]


async def test_rolls_back_on_exception_and_reraises_it(backend: Backend) -> None:
    boom = ValueError("boom")
    with pytest.raises(ValueError) as raised:
        if backend.is_async:
            async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                await session.execute(items.insert().values(name="lost"))
                raise boom
        else:
            with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                session.execute(items.insert().values(name="lost"))
                raise boom
    assert raised.value is boom
    assert backend.names() == []
    assert backend.checkedout() == 0


async def test_a_failed_commit_raises_and_leaves_no_connection_out(backend: Backend) -> None:
    from .support import children

    with pytest.raises(sa.exc.IntegrityError):
        if backend.is_async:
            async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                await session.execute(children.insert().values(id=1, parent_id=42))
        else:
            with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                session.execute(children.insert().values(id=1, parent_id=42))
    assert backend.checkedout() == 0


@pytest.mark.parametrize("kind", ["sqlite-sync", "pg-sync"])
async def test_a_sync_engine_works_with_async_with_without_blocking_the_loop(
    kind: str, tmp_path: Any
) -> None:
    backend = make_backend(kind, tmp_path)
    try:
        async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
            assert isinstance(session, Session)
            await anyio.to_thread.run_sync(lambda: session.execute(items.insert().values(name="t")))
        assert backend.names() == ["t"]
        assert backend.checkedout() == 0
    finally:
        await backend.dispose()


async def test_cancellation_inside_async_with_rolls_back_and_closes(backend: Backend) -> None:
    inside = anyio.Event()

    async def work() -> None:
        async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
            await backend.insert(session, "cancelled")
            inside.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        await inside.wait()
        tg.cancel_scope.cancel()
    assert backend.names() == []
    assert backend.checkedout() == 0


def test_an_async_engine_with_a_plain_with_is_refused() -> None:
    engine: AsyncEngine = sa.ext.asyncio.create_async_engine("sqlite+aiosqlite://")
    with (
        pytest.raises(ConfigurationError, match="use `async with`"),
        session_scope(engine),  # type: ignore[arg-type]
    ):
        pass


def test_an_unsupported_source_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="takes an Engine"):
        session_scope("sqlite://")  # type: ignore[call-overload]
