"""A pytest plugin: every test runs in a transaction that is rolled back at its end.

Installed with sessionscope and loaded by pytest automatically (``pytest11`` entry point);
``-p sessionscope.testing`` loads it explicitly. Importing :mod:`sessionscope` never imports
this module (nor pytest).

The test holds one connection with an outer transaction. Sessions join it through a
``SAVEPOINT`` (``join_transaction_mode="create_savepoint"``), so the application's own commits
(the middleware's commit at response start, or ``session.commit()`` in a route) release a
savepoint, their rows are visible to the rest of the test, and everything is rolled back
when the test ends. The ``*_bound_app`` fixtures point every ``DBSessionMiddleware`` of the
application at that connection for the test's duration and restore it afterwards.

Tell the plugin about your application by overriding two fixtures in ``conftest.py``::

    import pytest
    from myapp.main import app, engine


    @pytest.fixture
    def sessionscope_engine():
        return engine


    @pytest.fixture
    def sessionscope_app():
        return app

A test of a sync application (``Engine``)::

    from starlette.testclient import TestClient


    def test_creating_an_item_is_visible_in_the_same_test(sessionscope_bound_app,
                                                           sessionscope_session):
        client = TestClient(sessionscope_bound_app)
        assert client.post("/items", json={"name": "a"}).status_code == 201
        assert sessionscope_session.scalar(select(func.count()).select_from(Item)) == 1
        # rolled back when the test ends: the next test sees an empty table

A test of an async application (``AsyncEngine``; run it with anyio's pytest plugin, or with
pytest-asyncio in auto mode, and call the app on the test's own event loop)::

    import httpx
    import pytest


    @pytest.mark.anyio
    async def test_creating_an_item(sessionscope_async_bound_app, sessionscope_async_session):
        transport = httpx.ASGITransport(app=sessionscope_async_bound_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/items", json={"name": "a"})).status_code == 201
        assert await sessionscope_async_session.scalar(select(func.count(Item.id))) == 1

The bound application shares one connection: send one request at a time. On SQLite (whose
Python drivers do not emit ``BEGIN`` themselves, which breaks savepoints) the plugin puts the
test connection in explicit-``BEGIN`` mode for the test's duration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

import pytest
import structlog.testing
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ._source import is_async_connection, is_async_engine
from .errors import ConfigurationError
from .middleware import DBSessionMiddleware

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

__all__ = [
    "async_rollback_connection",
    "bind_app",
    "capture_session_events",
    "find_middlewares",
    "rollback_connection",
]

_SAVEPOINT: Final = "create_savepoint"
_EVENT_PREFIX: Final = "db_session."


# -- helpers (usable without the fixtures) --------------------------------------------------


@contextmanager
def rollback_connection(engine: Engine) -> Iterator[Connection]:
    """A connection of ``engine`` inside a transaction that is rolled back on exit.

    Sessions bound to it with ``join_transaction_mode="create_savepoint"`` commit into
    savepoints; nothing reaches the database for good.
    """
    if is_async_engine(engine):
        raise ConfigurationError(
            "rollback_connection() got an AsyncEngine; use `async with "
            "async_rollback_connection(engine)` (fixture sessionscope_async_connection)."
        )
    connection = engine.connect()
    try:
        undo = _begin_outer(connection)
        try:
            yield connection
        finally:
            _end_outer(connection, undo)
    finally:
        connection.close()


@asynccontextmanager
async def async_rollback_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """An ``AsyncConnection`` of ``engine`` in a transaction that is rolled back on exit."""
    if not is_async_engine(engine):
        raise ConfigurationError(
            "async_rollback_connection() got a sync Engine; use `with "
            "rollback_connection(engine)` (fixture sessionscope_connection)."
        )
    connection = await engine.connect()
    try:
        undo = await connection.run_sync(_begin_outer)
        try:
            yield connection
        finally:
            await connection.run_sync(_end_outer, undo)
    finally:
        await connection.close()


def find_middlewares(app: Any) -> list[DBSessionMiddleware]:
    """Every ``DBSessionMiddleware`` in ``app``, outermost first.

    Follows a Starlette/FastAPI application's built middleware stack (building it now if the
    application has not served a request yet, exactly as its first request would), the
    ``.app`` attribute of each middleware, and mounted sub-applications.
    """
    found: list[DBSessionMiddleware] = []
    seen: set[int] = set()
    pending: list[Any] = [app]
    while pending:
        node = pending.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, DBSessionMiddleware):
            found.append(node)
        if hasattr(node, "middleware_stack") and hasattr(node, "build_middleware_stack"):
            if node.middleware_stack is None:
                node.middleware_stack = node.build_middleware_stack()
            pending.append(node.middleware_stack)
        pending.append(getattr(node, "app", None))
        for route in getattr(node, "routes", None) or ():
            pending.append(getattr(route, "app", None))
    return found


@contextmanager
def bind_app(
    app: Any, connection: Connection | AsyncConnection, *, name: str | None = None
) -> Iterator[list[DBSessionMiddleware]]:
    """Point the app's ``DBSessionMiddleware`` sessions at ``connection`` until exit.

    Binds the middlewares named ``name``, or (by default) those whose engine is the
    connection's engine. Their sessions join the connection's transaction through a
    savepoint. The session factory's configuration is restored on exit.
    """
    is_async = is_async_connection(connection)
    engine = connection.sync_engine if is_async_connection(connection) else connection.engine
    every = find_middlewares(app)
    chosen = [
        mw
        for mw in every
        if (mw.name == name if name is not None else mw.settings.source.engine is engine)
    ]
    if not chosen:
        have = [(mw.name, str(mw.settings.source.engine)) for mw in every]
        wanted = f"named {name!r}" if name is not None else f"on {engine}"
        raise ConfigurationError(
            f"bind_app(): no DBSessionMiddleware {wanted} in {type(app).__name__}; "
            f"found {have or 'none'}. Pass name= to bind a middleware whose sessionmaker "
            "has no engine."
        )
    for mw in chosen:
        if mw.settings.source.is_async != is_async:
            kind = "an AsyncConnection" if is_async else "a sync Connection"
            raise ConfigurationError(
                f"bind_app(): DBSessionMiddleware(name={mw.name!r}) makes "
                f"{'async' if mw.settings.source.is_async else 'sync'} sessions but got "
                f"{kind}; use the {'async_' if not is_async else ''}rollback connection."
            )
    saved = [(mw, dict(mw.settings.source.factory.kw)) for mw in chosen]
    try:
        for mw in chosen:
            mw.settings.source.factory.configure(bind=connection, join_transaction_mode=_SAVEPOINT)
        yield chosen
    finally:
        for mw, kw in saved:
            factory_kw = mw.settings.source.factory.kw
            factory_kw.clear()
            factory_kw.update(kw)


@contextmanager
def capture_session_events() -> Iterator[list[dict[str, Any]]]:
    """Capture the structlog events of request sessions (``db_session.*``) while in the block.

    ``with capture_session_events() as events:`` — ``events`` is a list of event dicts
    (``event``, ``log_level``, ``db``, ``outcome``...) filled in as they happen. Like
    ``structlog.testing.capture_logs``, configured processors are off meanwhile and other
    events are dropped; not thread-safe. The events are captured whether the application
    configured structlog or not (sessionscope logs through ``logging`` when it did not, and
    is left so afterwards).
    """
    capture = _SessionEventCapture()
    configured = structlog.is_configured()
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    try:
        # the same list object: loggers already bound keep a reference to it
        processors.clear()
        processors.append(capture)
        structlog.configure(processors=processors)
        yield cast(list[dict[str, Any]], capture.entries)
    finally:
        processors.clear()
        processors.extend(saved)
        if configured:
            structlog.configure(processors=processors)
        else:
            structlog.reset_defaults()


class _SessionEventCapture(structlog.testing.LogCapture):
    """Keeps ``db_session.*`` events only."""

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> NoReturn:
        if str(event_dict.get("event", "")).startswith(_EVENT_PREFIX):
            super().__call__(logger, method_name, event_dict)
        raise structlog.DropEvent


# -- SQLite: savepoints need an explicit BEGIN ----------------------------------------------


def _begin_outer(connection: Connection) -> tuple[Any, Any] | None:
    """Begin the outer transaction; on SQLite, make it a real ``BEGIN``. Returns an undo."""
    connection.begin()
    if connection.dialect.name != "sqlite":
        return None
    raw: Any = connection.connection.dbapi_connection
    # The driver's connection (sqlite3's, or aiosqlite's wrapping it) says whether SQLite has a
    # transaction open already: under PEP 249 transaction control (``autocommit=False``) it
    # always has one, and a BEGIN would fail.
    driver: Any = connection.connection.driver_connection
    if getattr(driver, "in_transaction", False) or raw.isolation_level is None:
        return None  # PEP 249 transaction control, or the app already emits BEGIN itself
    level = raw.isolation_level
    raw.isolation_level = None
    connection.exec_driver_sql("BEGIN")
    return raw, level


def _end_outer(connection: Connection, undo: tuple[Any, Any] | None) -> None:
    transaction = connection.get_transaction()
    if transaction is not None:
        transaction.rollback()
    if undo is not None:
        raw, level = undo
        raw.isolation_level = level


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def sessionscope_engine() -> Engine | AsyncEngine:
    """The application's engine. Override this fixture in your ``conftest.py``."""
    pytest.fail(
        "sessionscope: override the `sessionscope_engine` fixture in conftest.py to return "
        "your application's Engine or AsyncEngine."
    )


@pytest.fixture
def sessionscope_app() -> Any:
    """The application under test. Override this fixture in your ``conftest.py``."""
    pytest.fail(
        "sessionscope: override the `sessionscope_app` fixture in conftest.py to return "
        "your Starlette/FastAPI application."
    )


@pytest.fixture
def sessionscope_connection(sessionscope_engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction rolled back when the test ends (sync engines)."""
    with rollback_connection(sessionscope_engine) as connection:
        yield connection


@pytest.fixture
def sessionscope_session(sessionscope_connection: Connection) -> Iterator[Session]:
    """A ``Session`` on the test's connection; its commits are savepoints."""
    session = Session(bind=sessionscope_connection, join_transaction_mode=_SAVEPOINT)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def sessionscope_bound_app(sessionscope_app: Any, sessionscope_connection: Connection) -> Any:
    """``sessionscope_app`` with its request sessions on the test's connection."""
    with bind_app(sessionscope_app, sessionscope_connection):
        yield sessionscope_app


@pytest.fixture
async def sessionscope_async_connection(
    sessionscope_engine: AsyncEngine,
) -> AsyncIterator[AsyncConnection]:
    """An ``AsyncConnection`` in a transaction rolled back when the test ends.

    At teardown the engine's pool is disposed as well: async drivers' connections belong to
    the event loop that opened them, and each test may run on a loop of its own.
    """
    try:
        async with async_rollback_connection(sessionscope_engine) as connection:
            yield connection
    finally:
        await sessionscope_engine.dispose()


@pytest.fixture
async def sessionscope_async_session(
    sessionscope_async_connection: AsyncConnection,
) -> AsyncIterator[AsyncSession]:
    """An ``AsyncSession`` on the test's connection; its commits are savepoints."""
    from sqlalchemy.ext.asyncio import AsyncSession

    session = AsyncSession(bind=sessionscope_async_connection, join_transaction_mode=_SAVEPOINT)
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
async def sessionscope_async_bound_app(
    sessionscope_app: Any, sessionscope_async_connection: AsyncConnection
) -> AsyncIterator[Any]:
    """``sessionscope_app`` with its async request sessions on the test's connection."""
    with bind_app(sessionscope_app, sessionscope_async_connection):
        yield sessionscope_app


@pytest.fixture
def sessionscope_registry() -> CollectorRegistry:
    """A fresh Prometheus ``CollectorRegistry`` for one test's metric assertions."""
    return CollectorRegistry()


@pytest.fixture
def sessionscope_events() -> Iterator[list[dict[str, Any]]]:
    """The ``db_session.*`` structlog events of the test, as a live list of dicts."""
    with capture_session_events() as events:
        yield events
