"""``session_scope``: the request lifecycle for work outside requests (scripts, workers, jobs)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Generic, TypeVar, overload

import anyio
import anyio.to_thread
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .errors import ConfigurationError
from .source import AnySession, SessionSource, resolve_source

S = TypeVar("S", bound=AnySession)


class session_scope(Generic[S]):
    """A session that commits on success, rolls back on exception and is always closed.

    ``with session_scope(engine) as session:`` for a sync ``Engine`` or ``sessionmaker``;
    ``async with session_scope(async_engine) as session:`` for an ``AsyncEngine`` or
    ``async_sessionmaker`` (a sync source also works with ``async with``: its I/O then runs in
    a worker thread). Cleanup after ``async with`` is shielded from cancellation.

    Args:
        source: an ``Engine``, ``AsyncEngine``, ``sessionmaker`` or ``async_sessionmaker``.
        name: the database's name, for logs.
    """

    __slots__ = ("_session", "_source", "name")

    @overload
    def __init__(
        self: session_scope[Session],
        source: Engine | sessionmaker[Any],
        *,
        name: str = "default",
    ) -> None: ...

    @overload
    def __init__(
        self: session_scope[AsyncSession],
        source: AsyncEngine | async_sessionmaker[Any],
        *,
        name: str = "default",
    ) -> None: ...

    def __init__(
        self,
        source: Engine | AsyncEngine | sessionmaker[Any] | async_sessionmaker[Any],
        *,
        name: str = "default",
    ) -> None:
        self._source: SessionSource = _resolve(source)
        self.name = name
        self._session: Any = None

    def __enter__(self) -> Session:
        if self._source.is_async:
            raise ConfigurationError(
                "session_scope() got an async engine or sessionmaker: use `async with`."
            )
        self._session = session = self._source.new_session()
        assert isinstance(session, Session)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: Session = self._session
        self._session = None
        try:
            if exc is None:
                try:
                    session.commit()
                except BaseException:
                    session.rollback()
                    raise
        finally:
            session.close()

    async def __aenter__(self) -> S:
        self._session = self._source.new_session()
        return self._session  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: AnySession = self._session
        self._session = None
        if exc is None:
            try:
                with anyio.CancelScope(shield=True):
                    await _call(session, "commit")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await _call(session, "close")
                raise
        with anyio.CancelScope(shield=True):
            await _call(session, "close")


async def _call(session: AnySession, method: str) -> None:
    if isinstance(session, AsyncSession):
        await getattr(session, method)()
    else:
        await anyio.to_thread.run_sync(getattr(session, method))


def _resolve(source: object) -> SessionSource:
    kwargs: dict[str, Any] = {"engine": None, "sessionmaker_": None, "async_sessionmaker_": None}
    if isinstance(source, Engine | AsyncEngine):
        kwargs["engine"] = source
    elif isinstance(source, async_sessionmaker):
        kwargs["async_sessionmaker_"] = source
    elif isinstance(source, sessionmaker):
        kwargs["sessionmaker_"] = source
    else:
        raise ConfigurationError(
            "session_scope() takes an Engine, AsyncEngine, sessionmaker or "
            f"async_sessionmaker, not {type(source).__name__}."
        )
    return resolve_source(**kwargs, owner="session_scope()")
