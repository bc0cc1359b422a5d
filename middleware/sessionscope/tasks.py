"""Sessions for concurrent work inside one request: one session per task.

A session must never be used by two tasks at once, so the request session cannot be shared
with ``asyncio.gather`` or an anyio task group. These helpers give each task its own session
from the same sessionmaker as the request session (same engine, same options, same session
class)::

    async def endpoint(request):
        async def load_user(session):
            return (await session.execute(select(User).where(User.id == 1))).scalar_one()

        async def load_orders(session):
            return (await session.execute(select(Order))).scalars().all()

        user, orders = await gather_with_sessions(request, load_user, load_orders, commit=False)

    async def one_task(request):
        async with task_session(request) as session:
            session.add(AuditEntry(...))

What happens to a task session:

* **commit** (``commit=True``, the default): the task's work is committed when the task
  ends without an exception. This is independent of the request's response status: a task
  session is its own unit of work, like :func:`sessionscope.session_scope`, and its commit
  is not undone when the request later answers ``4xx``. Pass ``commit=False`` for read-only
  fan-out; the transaction then ends with a rollback.
* **rollback**: when the task raises or is cancelled (e.g. because a sibling task failed),
  its transaction is rolled back.
* **close**: always, shielded from cancellation; the connection goes back to the pool.

Each task checks out its own connection: a request running ``n`` tasks may hold ``n + 1``
connections at once (its own session's, if it used one). Size the pool for it.

Task sessions are not the request session: their statements are not counted in the
request's ``statements`` and their writes are never reported as late writes.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from time import perf_counter
from typing import Any, TypeVar, overload

import anyio
import anyio.to_thread

from . import _outcome as oc
from . import _statements as statements
from ._lifecycle import SessionSettings
from ._request_state import RequestState
from ._session_calls import run_to_completion
from ._source import AnySession, is_async_session
from .errors import ConfigurationError, SessionNotAvailableError

__all__ = ["gather_with_sessions", "task_session"]

S = TypeVar("S", bound=AnySession)

TaskFunction = Callable[[Any], Awaitable[Any]] | Callable[[Any], Any]
"""``async def fn(session)`` or ``def fn(session)`` (run off the event loop, see below)."""


@overload
def task_session(
    request: Any, name: str | None = None, *, commit: bool = True, kind: None = None
) -> AbstractAsyncContextManager[Any]: ...


@overload
def task_session(
    request: Any, name: str | None = None, *, commit: bool = True, kind: type[S]
) -> AbstractAsyncContextManager[S]: ...


def task_session(
    request: Any,
    name: str | None = None,
    *,
    commit: bool = True,
    kind: type[Any] | None = None,
) -> AbstractAsyncContextManager[Any]:
    """A new session for one task of ``request``, from the request session's sessionmaker.

    ``async with task_session(request) as session:`` commits on success when ``commit`` is
    true, rolls back on an exception or cancellation, and always closes the session.

    Args:
        request: the Starlette/FastAPI ``Request`` (or ``WebSocket``), or its ASGI scope.
        name: the database, as named in ``DBSessionMiddleware(name=...)``; by default the
            only one, or the one named ``"default"``.
        commit: commit the task's transaction when the block ends without an exception.
        kind: ``Session`` or ``AsyncSession``: the expected session type (for type checkers,
            and a clear error on a mismatch).
    """
    scope = _scope_of(request)
    return _task_session(_settings_of(scope, name), scope, commit=commit, kind=kind)


async def gather_with_sessions(
    request: Any,
    *functions: TaskFunction,
    name: str | None = None,
    commit: bool = True,
) -> list[Any]:
    """Run ``functions`` concurrently, each with a session of its own; their results in order.

    Each function is called with its task's session:

    * ``async def fn(session)`` is awaited on the event loop (use it with an async database);
    * ``def fn(session)`` runs in a worker thread with a sync ``Session`` (with an async
      database, the ``AsyncSession``'s ``sync_session``, through ``run_sync``).

    The tasks run in an anyio task group: when one raises, the others are cancelled and
    their transactions rolled back, and the errors are raised as an ``ExceptionGroup``
    (catch them with ``except*``). Tasks that had already finished keep their commits.
    """
    scope = _scope_of(request)
    settings = _settings_of(scope, name)
    results: list[Any] = [None] * len(functions)

    async def run(index: int, function: TaskFunction) -> None:
        async with _task_session(settings, scope, commit=commit, kind=None) as session:
            results[index] = await _call_with(function, session)

    async with anyio.create_task_group() as group:
        for index, function in enumerate(functions):
            group.start_soon(run, index, function)
    return results


# -- one task's session --------------------------------------------------------------------


@asynccontextmanager
async def _task_session(
    settings: SessionSettings, scope: Mapping[str, Any], *, commit: bool, kind: type[Any] | None
) -> AsyncIterator[Any]:
    session = settings.source.new_session()
    if kind is not None and not isinstance(session, kind):
        await run_to_completion(session, "close")
        raise SessionNotAvailableError(
            f"task_session(kind={kind.__name__}) but the database gives "
            f"{type(session).__name__} sessions."
        )
    sync = session.sync_session if is_async_session(session) else session
    reporter = settings.reporter
    reporter.task_opened()
    opened = perf_counter()
    outcome = oc.UNUSED
    try:
        with statements.detached():
            try:
                yield session
            except BaseException:
                outcome = oc.ROLLBACK if sync.in_transaction() else oc.UNUSED
                await run_to_completion(session, "close")  # close() rolls the transaction back
                raise
            began = sync.in_transaction()
            if commit and began:
                try:
                    await run_to_completion(session, "commit")
                except BaseException:
                    outcome = oc.ROLLBACK
                    await run_to_completion(session, "close")
                    raise
                outcome = oc.COMMIT
            elif began:
                outcome = oc.ROLLBACK
            await run_to_completion(session, "close")
    finally:
        reporter.task_closed(reporter.routes.label(scope), outcome, perf_counter() - opened)


async def _call_with(function: TaskFunction, session: AnySession) -> Any:
    if inspect.iscoroutinefunction(function):
        return await function(session)
    if is_async_session(session):
        result = await session.run_sync(function)
    else:
        result = await anyio.to_thread.run_sync(function, session)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise ConfigurationError(
            f"gather_with_sessions(): {function!r} returned an awaitable; declare it "
            "`async def fn(session)` so it runs on the event loop."
        )
    return result


def _scope_of(request: Any) -> Mapping[str, Any]:
    scope = getattr(request, "scope", request)
    if not isinstance(scope, Mapping) or "type" not in scope:
        raise ConfigurationError(
            "expected a Starlette Request/WebSocket or an ASGI scope, "
            f"not {type(request).__name__}."
        )
    return scope


def _settings_of(scope: Mapping[str, Any], name: str | None) -> SessionSettings:
    """The middleware settings of database ``name``, while the request runs."""
    state = scope.get("state")
    if not isinstance(state, RequestState):
        state = RequestState(None)  # no middleware ran: resolve() says what to do
    wanted = state.resolve(name, asked_by="task sessions")
    settings: SessionSettings | None = state.settings(wanted)
    if settings is None:
        # the middleware withdraws the request's databases once the request has finished
        raise SessionNotAvailableError(
            f"the request has finished: task sessions of database {wanted!r} are opened while "
            "it runs; work that outlives the request needs its own session, e.g. "
            "`async with session_scope(engine) as session:`."
        )
    return settings
