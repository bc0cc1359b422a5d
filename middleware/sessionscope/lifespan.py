"""A lifespan that checks the databases at startup and disposes their engines at shutdown.

::

    app = FastAPI(lifespan=database_lifespan(engine))

    # with a lifespan of your own: it runs inside, after the check and before the disposal
    app = FastAPI(lifespan=database_lifespan(engine, replica, lifespan=my_lifespan))

    # or inside your own lifespan
    @asynccontextmanager
    async def my_lifespan(app):
        async with database_lifespan(engine)(app):
            yield {"cache": ...}

At startup every engine runs ``SELECT 1`` (concurrently, each within ``timeout`` seconds).
If one cannot, the application does not start: :class:`DatabaseUnavailableError` names every
failing database by driver, host, port, database and user, never by password, and the
driver's message is shown with the password removed. At shutdown every engine is disposed
(its pooled connections closed), sync engines in a worker thread, also when startup failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import anyio
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ._reporting import event_log
from ._source import is_async_engine, require_asyncio
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "DatabaseUnavailableError",
    "check_databases",
    "database_lifespan",
    "describe_database",
    "dispose_engines",
]

AnyEngine: TypeAlias = "Engine | AsyncEngine"
Lifespan = Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
"""A Starlette/FastAPI ``lifespan=``: ``app -> async context manager`` yielding state."""

DEFAULT_TIMEOUT: Final = 10.0
"""Seconds each database has to answer the startup check."""

_PROBE: Final = sa.text("SELECT 1")


class DatabaseUnavailableError(RuntimeError):
    """A database did not answer the startup check; the message says which and why.

    The message never contains a password. ``causes`` maps each failing database's
    description to the original exception (whose text may come from the driver).
    """

    def __init__(self, message: str, causes: dict[str, BaseException]) -> None:
        super().__init__(message)
        self.causes = causes


def database_lifespan(
    *engines: AnyEngine,
    lifespan: Lifespan | None = None,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Lifespan:
    """A ``lifespan=`` for Starlette/FastAPI that checks ``engines`` and disposes them.

    Args:
        engines: the ``Engine``/``AsyncEngine`` objects the application uses.
        lifespan: the application's own lifespan; it runs after the startup check and before
            the engines are disposed, and the state it yields is passed on.
        check: run the startup check (``SELECT 1`` on each engine).
        timeout: seconds each database has to answer the check.
    """
    _validate(engines, "database_lifespan()")
    if timeout <= 0:
        raise ConfigurationError(f"database_lifespan(): timeout must be positive, got {timeout}.")

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Mapping[str, Any] | None]:
        try:
            if check:
                await check_databases(*engines, timeout=timeout)
            if lifespan is None:
                yield None
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            await dispose_engines(*engines)

    return run


async def check_databases(
    *engines: AnyEngine,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (per database, named in the error)
) -> None:
    """Run ``SELECT 1`` on every engine at once; raise :class:`DatabaseUnavailableError`.

    A sync engine's check runs in a worker thread; if it does not answer within ``timeout``
    the thread is abandoned (it ends when the driver gives up).
    """
    _validate(engines, "check_databases()")
    failures: list[tuple[AnyEngine, Exception]] = []
    bugs: list[Exception] = []

    async def probe(engine: AnyEngine) -> None:
        try:
            with anyio.fail_after(timeout):
                if is_async_engine(engine):
                    async with engine.connect() as conn:
                        await conn.execute(_PROBE)
                else:
                    await anyio.to_thread.run_sync(_probe_sync, engine, abandon_on_cancel=True)
        except Exception as exc:
            if _from_database(exc, engine):
                failures.append((engine, exc))
            else:  # a bug, not the database: raised as it is, below
                bugs.append(exc)

    async with anyio.create_task_group() as group:
        for engine in engines:
            group.start_soon(probe, engine)
    if len(bugs) == 1:
        raise bugs[0]
    if bugs:
        raise ExceptionGroup("sessionscope: the database check failed", bugs)
    if failures:
        lines = [
            f"  - {describe_database(engine)}: {_reason(exc, engine, timeout)}"
            for engine, exc in failures
        ]
        raise DatabaseUnavailableError(
            f"sessionscope: {len(failures)} of {len(engines)} database(s) did not answer at "
            "startup:\n"
            + "\n".join(lines)
            + "\nCheck the database URL (host, port, database name, credentials) and that "
            "the server is running and reachable.",
            {describe_database(engine): exc for engine, exc in failures},
        ) from None


async def dispose_engines(*engines: AnyEngine) -> None:
    """Dispose every engine (close its pooled connections), shielded from cancellation.

    A failure is logged (``db_lifespan.dispose_failed``) and the other engines are still
    disposed.
    """
    with anyio.CancelScope(shield=True):
        for engine in engines:
            try:
                if is_async_engine(engine):
                    await engine.dispose()
                else:
                    await anyio.to_thread.run_sync(engine.dispose)
            except Exception as exc:
                event_log().error(
                    "db_lifespan.dispose_failed",
                    database=describe_database(engine),
                    error_type=type(exc).__name__,
                    error=_scrub(str(exc), engine),
                )


def describe_database(engine: AnyEngine) -> str:
    """``postgresql+asyncpg database 'app' at db.internal:5432 (user 'web')``; no password."""
    url = engine.url
    what = f"{url.drivername} database {url.database!r}"
    if url.host:
        what += f" at {url.host}:{url.port}" if url.port else f" at {url.host}"
    if url.username:
        what += f" (user {url.username!r})"
    return what


def _probe_sync(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(_PROBE)


def _from_database(exc: Exception, engine: AnyEngine) -> bool:
    """Whether ``exc`` means the database did not answer, rather than a bug.

    SQLAlchemy's errors, the network's (``OSError``), the timeout, and errors the driver raised
    itself (asyncpg's refusals of a login reach us unwrapped on some SQLAlchemy releases).
    """
    if isinstance(exc, SQLAlchemyError | OSError | TimeoutError):
        return True
    package = type(exc).__module__.partition(".")[0].lower()
    return package == str(engine.dialect.driver).lower()


def _reason(exc: BaseException, engine: AnyEngine, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    text = " ".join(str(cause).split()) or "(no message)"
    return f"{type(cause).__name__}: {_scrub(text, engine)}"


def _scrub(text: str, engine: AnyEngine) -> str:
    password = engine.url.password
    if password:
        text = text.replace(str(password), "***")
    return text


def _validate(engines: tuple[Any, ...], owner: str) -> None:
    if not engines:
        raise ConfigurationError(f"{owner} needs at least one Engine or AsyncEngine.")
    for engine in engines:
        if is_async_engine(engine):
            require_asyncio(owner, engine)
        elif not isinstance(engine, Engine):
            raise ConfigurationError(
                f"{owner} takes Engine and AsyncEngine objects, not {type(engine).__name__}; "
                "pass the engine a sessionmaker is bound to."
            )
