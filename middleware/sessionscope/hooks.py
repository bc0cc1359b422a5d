"""After-commit hooks: side effects that must happen only if the request's data was committed.

``on_commit(request_or_session, callback)`` registers ``callback`` (sync or async, no
arguments) on the request's session. It runs only if the request transaction commits: right
after the commit and before the client receives the status, or, with ``after_response=True``,
once the application has returned (the response is complete). On rollback, a failed commit or
an exception it never runs. A hook that raises is logged (``db_session.hook_failed``) and
counted (``db_session_errors_total{phase="hook"}``); it never turns a committed request into an
error, and the hooks after it still run. Sync callbacks run in a worker thread.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio.to_thread

from ._record import REQUEST_KEY
from ._request_state import RequestState
from .errors import SessionNotAvailableError

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from ._source import AnySession

Hook = Callable[[], Any] | Callable[[], Awaitable[Any]]


class _Hooked(Protocol):
    """What :func:`on_commit` needs of a request session (the state machine satisfies it)."""

    hooks: CommitHooks | None

    @property
    def started(self) -> bool: ...


class CommitHooks:
    """The hooks registered on one request session, in order."""

    __slots__ = ("after", "before")

    def __init__(self) -> None:
        self.before: list[Hook] = []
        self.after: list[Hook] = []

    async def run(self, hooks: list[Hook], failed: Callable[[Hook, BaseException], None]) -> None:
        """Run ``hooks``; a failure is given to ``failed`` (which reports it), never raised."""
        for hook in hooks:
            try:
                result = hook() if inspect.iscoroutinefunction(hook) else await _in_thread(hook)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                failed(hook, exc)


async def _in_thread(hook: Hook) -> Any:
    return await anyio.to_thread.run_sync(hook)


def on_commit(
    target: HTTPConnection | AnySession,
    callback: Hook,
    *,
    after_response: bool = False,
    name: str | None = None,
) -> None:
    """Run ``callback`` only if the request's transaction commits.

    Args:
        target: the request (``Request``), or a request session (``DBSession``).
        callback: a function or coroutine function without arguments.
        after_response: run once the response is complete instead of before the status is
            sent (the client does not wait for it; a failure can no longer be reported to it).
        name: with a request and several databases, which database's commit to wait for.
    """
    if not callable(callback):
        raise TypeError(f"on_commit() needs a callable, got {callback!r}")
    rs = _request_session(target, name)
    if rs.started:
        raise RuntimeError(
            "on_commit() was called after the request transaction was decided (the response "
            "had started); call it while handling the request, before returning the response."
        )
    hooks = rs.hooks
    if hooks is None:
        hooks = rs.hooks = CommitHooks()
    (hooks.after if after_response else hooks.before).append(callback)


def _request_session(target: Any, name: str | None) -> _Hooked:
    info = getattr(target, "info", None)
    if isinstance(info, dict) and REQUEST_KEY in info:
        rs: _Hooked = info[REQUEST_KEY]
        return rs
    scope = getattr(target, "scope", None)
    state = scope.get("state") if isinstance(scope, dict) else None
    if not isinstance(state, RequestState):
        raise SessionNotAvailableError(
            "on_commit() needs the request (or its session) of a request handled by "
            "DBSessionMiddleware; for work outside requests, act after session_scope() exits."
        )
    wanted = state.resolve(name, asked_by="on_commit()")
    return _request_session(state[state.names[wanted]], None)
