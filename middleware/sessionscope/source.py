"""Where sessions come from: one engine or sessionmaker, sync or async, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import Pool

from .errors import ConfigurationError
from .read_only import read_only_engine

AnySession = Session | AsyncSession
"""A request session: ``sqlalchemy.orm.Session`` or ``sqlalchemy.ext.asyncio.AsyncSession``."""


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
        if isinstance(engine, AsyncEngine):
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
        if isinstance(sessionmaker_, async_sessionmaker):
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
    if not isinstance(async_sessionmaker_, async_sessionmaker):
        raise ConfigurationError(
            f"{owner}: async_sessionmaker= must be a "
            "sqlalchemy.ext.asyncio.async_sessionmaker, "
            f"not {type(async_sessionmaker_).__name__}; a sync sessionmaker goes in sessionmaker=."
        )
    return SessionSource(
        async_sessionmaker_, True, _sync_engine(async_sessionmaker_.kw.get("bind"))
    )


def _sync_engine(bind: object) -> Engine | None:
    if isinstance(bind, AsyncEngine):
        return bind.sync_engine
    if isinstance(bind, Engine):
        return bind
    return None


def replica_source(primary: SessionSource, replica: object, *, owner: str) -> SessionSource:
    """A source like ``primary`` (same session class and options) bound to ``replica``, whose
    transactions the database runs read-only (see :mod:`sessionscope.read_only`)."""
    if primary.is_async and not isinstance(replica, AsyncEngine):
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
    if isinstance(primary.factory, async_sessionmaker):
        assert isinstance(replica, AsyncEngine)
        factory = async_sessionmaker(
            read_only_engine(replica), class_=primary.factory.class_, **options
        )
        return SessionSource(factory, True, replica.sync_engine)
    assert isinstance(replica, Engine)
    # sessionmaker() makes a subclass of the class it is given: hand it the user's class.
    base = primary.factory.class_.__bases__[0]
    factory = sessionmaker(read_only_engine(replica), class_=base, **options)
    return SessionSource(factory, False, replica)
