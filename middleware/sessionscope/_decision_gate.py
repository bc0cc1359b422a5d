"""Keeping a request session's statements and its commit decision apart.

A ``BaseHTTPMiddleware`` (``@app.middleware("http")``) inside ``DBSessionMiddleware`` runs the
application in a task of its own and forwards its response start from another task: the
application's streaming body runs on while the middleware commits. A statement and the commit
on the same session at once break both (a dead stream, a failed commit, a connection back in
the pool inside a transaction). For such stacks every request session gets a
:class:`DecisionGate`: the decision waits until no statement of the session is running, and a
statement that starts while the decision runs waits until it is done (then it runs in a new
transaction, late, rolled back at close unless committed).

Only ``Session.execute`` and what goes through it (``scalar``, ``get``, ORM queries, lazy
loads, ``refresh``) is held back: those pass through SQLAlchemy's public ``do_orm_execute``
session event. Other stacks get no gate and pay nothing.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.from_thread
import anyio.lowlevel
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.util import await_only  # await_ since SQLAlchemy 2.1, which keeps this name

from .errors import ConcurrentSessionUseError

if TYPE_CHECKING:
    from anyio.lowlevel import EventLoopToken
    from sqlalchemy.ext.asyncio import AsyncSession

_DECIDING: Final[ContextVar[bool]] = ContextVar("sessionscope_deciding", default=False)
"""True in the decision's own context: statements its commit listeners run pass the gate."""


class DecisionGate:
    """Statements of one request session on one side, its commit decision on the other."""

    __slots__ = (
        "_deciding",
        "_idle",
        "_is_async",
        "_lock",
        "_loop_thread",
        "_open",
        "_opened",
        "_token",
        "_users",
    )

    def __init__(self, loop_thread: int, *, is_async: bool) -> None:
        self._is_async = is_async
        """An ``AsyncSession``'s: its statements run in a greenlet on the event loop."""
        self._lock = threading.Lock()
        self._users = 0
        self._deciding = False
        self._opened = threading.Event()
        """Set while no decision runs: worker threads wait on it."""
        self._open: anyio.Event | None = None
        """Set when the decision is done: statements on the event loop wait on it."""
        self._idle: anyio.Event | None = None
        """Set when the last running statement ends: the decision waits on it."""
        self._token: EventLoopToken | None = None
        self._loop_thread = loop_thread
        """The request's event loop thread."""
        self._opened.set()

    def watch(self, session: Session | AsyncSession) -> None:
        """Route ``session``'s statements through this gate."""
        sync = session if isinstance(session, Session) else session.sync_session
        event.listen(sync, "do_orm_execute", self._statement)

    async def close(self) -> None:
        """Wait until no statement runs, then hold new ones back until :meth:`open`."""
        while True:
            with self._lock:
                if self._users == 0:
                    self._deciding = True
                    self._opened.clear()
                    self._open = anyio.Event()
                    self._idle = None
                    break
                idle = self._idle = anyio.Event()
                self._token = anyio.lowlevel.current_token()
            await idle.wait()
        _DECIDING.set(True)

    def open(self) -> None:
        """The decision is done: let the statements waiting for it run."""
        _DECIDING.set(False)
        with self._lock:
            self._deciding = False
            opened = self._open
            self._open = None
        self._opened.set()
        if opened is not None:
            opened.set()

    def _statement(self, state: ORMExecuteState) -> Any:
        self._enter()
        try:
            return state.invoke_statement()
        finally:
            self._leave()

    def _enter(self) -> None:
        while True:
            with self._lock:
                if not self._deciding or _DECIDING.get():
                    self._users += 1
                    return
                opened = self._open
            if opened is None:
                continue
            if self._is_async:
                # The listener runs in the greenlet of the AsyncSession call: await_only is how
                # SQLAlchemy's own async drivers wait for the event loop from there.
                await_only(opened.wait())
            elif threading.get_ident() == self._loop_thread:
                # A sync session used on the event loop itself cannot wait here: the decision
                # needs this thread to finish.
                raise ConcurrentSessionUseError(
                    "the request session was used on the event loop while the middleware was "
                    "committing it; run a sync session's statements in a worker thread (a "
                    "`def` endpoint or generator), or use an AsyncSession"
                )
            else:
                self._opened.wait()

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            idle = self._idle if self._users == 0 else None
            if idle is not None:
                self._idle = None
        if idle is None:
            return
        if threading.get_ident() == self._loop_thread:
            idle.set()
        else:
            anyio.from_thread.run_sync(idle.set, token=self._token)
