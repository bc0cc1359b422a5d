"""Where sessions come from: one engine or sessionmaker, sync or async, validated once."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import SingletonThreadPool

from ._read_only import read_only_engine
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import (
        AsyncConnection,
        AsyncEngine,
        AsyncSession,
        async_sessionmaker,
    )
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import Pool
    from typing_extensions import TypeIs

AnySession: TypeAlias = "Session | AsyncSession"
"""A request session: ``sqlalchemy.orm.Session`` or ``sqlalchemy.ext.asyncio.AsyncSession``."""

# SQLAlchemy's asyncio extension needs greenlet, which SQLAlchemy 2.1 no longer installs: it is
# imported only when the application hands over one of its objects. Such an object exists only
# once the extension's modules are loaded, so looking them up in sys.modules answers "is it
# async?" without importing anything.
_ASYNC_ENGINE_MODULE = "sqlalchemy.ext.asyncio.engine"
_ASYNC_SESSION_MODULE = "sqlalchemy.ext.asyncio.session"
INSTALL_ASYNCIO = "pip install 'sessionscope[asyncio]'"


def _is_loaded_instance(obj: object, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))


def is_async_engine(obj: object) -> TypeIs[AsyncEngine]:
    """Whether ``obj`` is an ``AsyncEngine`` (without importing the asyncio extension)."""
    return _is_loaded_instance(obj, _ASYNC_ENGINE_MODULE, "AsyncEngine")


def is_async_connection(obj: object) -> TypeIs[AsyncConnection]:
    """Whether ``obj`` is an ``AsyncConnection`` (without importing the asyncio extension)."""
    return _is_loaded_instance(obj, _ASYNC_ENGINE_MODULE, "AsyncConnection")


def is_async_session(obj: object) -> TypeIs[AsyncSession]:
    """Whether ``obj`` is an ``AsyncSession`` (without importing the asyncio extension)."""
    return _is_loaded_instance(obj, _ASYNC_SESSION_MODULE, "AsyncSession")


def is_async_sessionmaker(obj: object) -> TypeIs[async_sessionmaker[Any]]:
    """Whether ``obj`` is an ``async_sessionmaker`` (without importing the asyncio extension)."""
    return _is_loaded_instance(obj, _ASYNC_SESSION_MODULE, "async_sessionmaker")


def asyncio_missing() -> ImportError | None:
    """Why SQLAlchemy's asyncio support cannot run here (greenlet is missing), or ``None``.

    Without greenlet, SQLAlchemy 2.1's first import of ``sqlalchemy.ext.asyncio`` fails (its
    engine and session modules stay loaded, and a second import succeeds); 2.0 imports it and
    fails at the first query. So greenlet itself is asked.
    """
    try:
        importlib.import_module("greenlet")
        importlib.import_module("sqlalchemy.ext.asyncio")
    except ImportError as error:
        return error
    return None


def require_asyncio(owner: str, given: object) -> None:
    """Raise ``ConfigurationError`` if SQLAlchemy's asyncio support cannot run here."""
    error = asyncio_missing()
    if error is not None:
        raise ConfigurationError(
            f"{owner} got an {type(given).__name__}, but SQLAlchemy's asyncio support needs the "
            f"greenlet library, which cannot be imported here ({error}). "
            f"Install it with: {INSTALL_ASYNCIO}"
        ) from error


@dataclass(frozen=True, slots=True)
class SessionSource:
    """A validated session factory and the engine it is bound to (if any)."""

    factory: sessionmaker[Any] | async_sessionmaker[Any]
    is_async: bool
    engine: Engine | None
    """The sync engine behind the factory (``AsyncEngine.sync_engine`` for async), if bound."""

    def new_session(self) -> AnySession:
        """A new session; it holds no connection until first used (SQLAlchemy autobegin)."""
        session: AnySession = self.factory()
        return session

    @property
    def pool(self) -> Pool | None:
        """The engine's current pool (it changes when the engine is disposed)."""
        return None if self.engine is None else self.engine.pool


def resolve_source(
    *,
    engine: Engine | AsyncEngine | None,
    sessionmaker_: sessionmaker[Any] | None,
    async_sessionmaker_: async_sessionmaker[Any] | None,
    owner: str,
) -> SessionSource:
    """Validate the ``engine=`` / ``sessionmaker=`` / ``async_sessionmaker=`` choice.

    Exactly one must be given. An engine gets a sessionmaker with ``expire_on_commit=False``:
    the request transaction commits when the response starts, and objects read afterwards
    (streaming bodies, background tasks) must not reload attributes, which an ``AsyncSession``
    cannot do implicitly at all.
    """
    given = [
        n
        for n, v in (
            ("engine", engine),
            ("sessionmaker", sessionmaker_),
            ("async_sessionmaker", async_sessionmaker_),
        )
        if v is not None
    ]
    if not given:
        raise ConfigurationError(
            f"{owner} needs a database: pass engine=<Engine or AsyncEngine>, "
            "sessionmaker=<sessionmaker> or async_sessionmaker=<async_sessionmaker>."
        )
    if len(given) > 1:
        raise ConfigurationError(
            f"{owner} got {' and '.join(given)}; pass exactly one of them "
            "(a sessionmaker already knows its engine)."
        )
    if engine is not None:
        if is_async_engine(engine):
            require_asyncio(owner, engine)
            from sqlalchemy.ext.asyncio import async_sessionmaker

            return SessionSource(
                async_sessionmaker(engine, expire_on_commit=False), True, engine.sync_engine
            )
        if isinstance(engine, Engine):
            return SessionSource(sessionmaker(engine, expire_on_commit=False), False, engine)
        raise ConfigurationError(
            f"{owner}: engine= must be a sqlalchemy Engine or AsyncEngine, "
            f"not {type(engine).__name__}; create one with create_engine() or "
            "create_async_engine()."
        )
    if sessionmaker_ is not None:
        if is_async_sessionmaker(sessionmaker_):
            raise ConfigurationError(
                f"{owner}: sessionmaker= got an async_sessionmaker; "
                "pass it as async_sessionmaker= instead."
            )
        if not isinstance(sessionmaker_, sessionmaker):
            raise ConfigurationError(
                f"{owner}: sessionmaker= must be a sqlalchemy.orm.sessionmaker, "
                f"not {type(sessionmaker_).__name__}."
            )
        return SessionSource(sessionmaker_, False, _sync_engine(sessionmaker_.kw.get("bind")))
    assert async_sessionmaker_ is not None
    if not is_async_sessionmaker(async_sessionmaker_):
        raise ConfigurationError(
            f"{owner}: async_sessionmaker= must be a "
            "sqlalchemy.ext.asyncio.async_sessionmaker, "
            f"not {type(async_sessionmaker_).__name__}; a sync sessionmaker goes in sessionmaker=."
        )
    require_asyncio(owner, async_sessionmaker_)
    return SessionSource(
        async_sessionmaker_, True, _sync_engine(async_sessionmaker_.kw.get("bind"))
    )


def refuse_connection_per_thread(source: SessionSource, *, option: str, owner: str) -> None:
    """Raise ``ConfigurationError`` if ``source``'s engine keeps one connection per thread.

    ``create_engine("sqlite://")`` (or ``":memory:"``) gets SQLAlchemy's
    ``SingletonThreadPool``: each thread its own connection (and so its own empty in-memory
    database), and SQLite's same-thread check on. A request session is used in more than one
    thread (a ``def`` route runs in the threadpool, the commit and close in a worker thread),
    so every such request fails at commit, and a thread that serves the next request while
    the first one's session is still open would be handed the same connection.
    """
    if source.engine is None or not isinstance(source.engine.pool, SingletonThreadPool):
        return
    raise ConfigurationError(
        f"{owner}: {option}= uses SQLAlchemy's SingletonThreadPool (create_engine()'s default "
        'for an in-memory SQLite database, "sqlite://" or ":memory:"): one connection per '
        "thread, each with its own in-memory database, usable only in its thread. A request "
        "session is used in more than one thread (a `def` route runs in the threadpool, the "
        "commit and close in a worker thread), so every such request would fail. Create the "
        "engine with one connection that any thread may use: "
        'create_engine("sqlite://", poolclass=StaticPool, '
        'connect_args={"check_same_thread": False}) (from sqlalchemy.pool import StaticPool), '
        'or use a database file: create_engine("sqlite:///app.db").'
    )


def _sync_engine(bind: object) -> Engine | None:
    if is_async_engine(bind):
        return bind.sync_engine
    if isinstance(bind, Engine):
        return bind
    return None


def replica_source(primary: SessionSource, replica: object, *, owner: str) -> SessionSource:
    """A source like ``primary`` (same session class and options) bound to ``replica``, whose
    transactions the database runs read-only (see :mod:`sessionscope._read_only`)."""
    if primary.is_async and not is_async_engine(replica):
        raise ConfigurationError(
            f"{owner}: the database is async, so replica_engine= must be an AsyncEngine, "
            f"not {type(replica).__name__}."
        )
    if not primary.is_async and not isinstance(replica, Engine):
        raise ConfigurationError(
            f"{owner}: replica_engine= must be a sync Engine like the primary, "
            f"not {type(replica).__name__}."
        )
    options = {k: v for k, v in primary.factory.kw.items() if k != "bind"}
    factory: sessionmaker[Any] | async_sessionmaker[Any]
    if is_async_sessionmaker(primary.factory):
        assert is_async_engine(replica)
        from sqlalchemy.ext.asyncio import async_sessionmaker

        factory = async_sessionmaker(
            read_only_engine(replica), class_=primary.factory.class_, **options
        )
        return SessionSource(factory, True, replica.sync_engine)
    assert isinstance(replica, Engine)
    # sessionmaker() makes a subclass of the class it is given: hand it the user's class.
    base = primary.factory.class_.__bases__[0]
    factory = sessionmaker(read_only_engine(replica), class_=base, **options)
    return SessionSource(factory, False, replica)
