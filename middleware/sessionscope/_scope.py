"""``session_scope``: the request lifecycle for work outside requests (scripts, workers, jobs)."""

from __future__ import annotations

import sys
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from ._metrics import DbMetrics, Metrics
from ._reporting import event_log
from ._session_calls import run_to_completion
from ._source import (
    AnySession,
    SessionSource,
    is_async_engine,
    is_async_sessionmaker,
    resolve_source,
)
from .catalogue import DEFAULT_NAMESPACE
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

S = TypeVar("S", bound=AnySession)


class session_scope(Generic[S]):
    """A session that commits on success, rolls back on exception and is always closed.

    ``with session_scope(engine) as session:`` for a sync ``Engine`` or ``sessionmaker``;
    ``async with session_scope(async_engine) as session:`` for an ``AsyncEngine`` or
    ``async_sessionmaker`` (a sync source also works with ``async with``: its I/O then runs in
    a worker thread). Cleanup after ``async with`` is shielded from cancellation.

    A session that is garbage-collected without having been closed (the scope entered by
    hand and dropped) is counted in ``db_sessions_gc_unclosed_total`` and logged with where
    it was opened.

    Args:
        source: an ``Engine``, ``AsyncEngine``, ``sessionmaker`` or ``async_sessionmaker``.
        name: the database's name, for logs and metrics.
        registry: the Prometheus registry (default: the global one).
        namespace: the metric name prefix.
    """

    __slots__ = ("_finalizer", "_metrics", "_session", "_source", "name")

    @overload
    def __init__(
        self: session_scope[Session],
        source: Engine | sessionmaker[Any],
        *,
        name: str = "default",
        registry: CollectorRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None: ...

    @overload
    def __init__(
        self: session_scope[AsyncSession],
        source: AsyncEngine | async_sessionmaker[Any],
        *,
        name: str = "default",
        registry: CollectorRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None: ...

    def __init__(
        self,
        source: Engine | AsyncEngine | sessionmaker[Any] | async_sessionmaker[Any],
        *,
        name: str = "default",
        registry: CollectorRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self._source: SessionSource = _resolve(source)
        self.name = name
        self._metrics = Metrics.on(registry, namespace).for_db(name)
        self._session: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _open(self) -> AnySession:
        session = self._source.new_session()
        caller = sys._getframe(2)
        self._finalizer = weakref.finalize(
            session,
            _report_unclosed,
            self._metrics,
            self.name,
            f"{caller.f_code.co_filename}:{caller.f_lineno}",
        )
        self._session = session
        return session

    def _take(self) -> Any:
        session, self._session = self._session, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return session

    def __enter__(self) -> Session:
        if self._source.is_async:
            raise ConfigurationError(
                "session_scope() got an async engine or sessionmaker: use `async with`."
            )
        session = self._open()
        assert isinstance(session, Session)
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: Session = self._take()
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
        return self._open()  # type: ignore[return-value]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session: AnySession = self._take()
        if exc is None:
            try:
                await run_to_completion(session, "commit")
            except BaseException:
                await run_to_completion(session, "close")
                raise
        await run_to_completion(session, "close")


def _report_unclosed(metrics: DbMetrics, name: str, opened_at: str) -> None:
    metrics.gc_unclosed.inc()
    event_log().warning(
        "db_session.gc_unclosed",
        db=name,
        opened_at=opened_at,
        detail="a session_scope() session was garbage-collected without being closed; "
        "use it as `with session_scope(...)` so it is always closed",
    )


def _resolve(source: object) -> SessionSource:
    kwargs: dict[str, Any] = {"engine": None, "sessionmaker_": None, "async_sessionmaker_": None}
    if isinstance(source, Engine) or is_async_engine(source):
        kwargs["engine"] = source
    elif is_async_sessionmaker(source):
        kwargs["async_sessionmaker_"] = source
    elif isinstance(source, sessionmaker):
        kwargs["sessionmaker_"] = source
    else:
        raise ConfigurationError(
            "session_scope() takes an Engine, AsyncEngine, sessionmaker or "
            f"async_sessionmaker, not {type(source).__name__}."
        )
    return resolve_source(**kwargs, owner="session_scope()")
