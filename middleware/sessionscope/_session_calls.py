"""One way to run a session's I/O, whether the session is sync or async.

Async sessions are awaited. Sync sessions never block the event loop: their commit, rollback
and close run in a worker thread. Finalizing a session that already holds a connection never
waits for the pool, so those calls run under a ``CapacityLimiter`` of their own (AnyIO worker
threads, not the application's threadpool tokens): they must not queue behind request threads
that are themselves blocked on a pool checkout that only a finished request can satisfy (the
threadpool/pool deadlock). A call that may need a checkout (a commit that still has to flush)
uses the application's ordinary threadpool, like any endpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from ._source import AnySession, is_async_session

FINALIZER_THREADS = 40
"""Tokens of the finalizers' own limiter: at most this many worker threads finalize sync
sessions that hold a connection at once, on one event loop."""
_CONNECTIONS: Final = "sessionscope_connections"
"""Key in ``Session.info``: the session's outermost transaction and the connections it began
(written by the ``after_begin`` listener of :func:`track_connections`)."""


class SessionCalls:
    """Runs ``commit``/``rollback``/``close``/``invalidate`` of request sessions."""

    __slots__ = ("_finalizers", "is_async")

    def __init__(self, *, is_async: bool, name: str) -> None:
        self.is_async = is_async
        """Whether the sessions are ``AsyncSession`` (their calls are awaited on the loop)."""
        # The finalizers' limiter: their own, so they never wait behind the threadpool. One per
        # event loop: a CapacityLimiter belongs to the loop that made it.
        self._finalizers: RunVar[anyio.CapacityLimiter] = RunVar(f"sessionscope_finalizers_{name}")

    async def call(self, session: AnySession, method: str, *, holds_connection: bool) -> None:
        """Run ``session.<method>()`` to completion, without blocking the event loop.

        ``holds_connection`` matters for sync sessions only (which thread runs the call).
        """
        bound = getattr(session, method)
        if self.is_async:
            # Shielded: a cancellation must not interrupt the driver half-way through.
            with anyio.CancelScope(shield=True):
                await cast(Callable[[], Awaitable[Any]], bound)()
        elif holds_connection and ends_without_io(cast(Session, session)):
            bound()  # nothing to flush and no transaction open in the driver: no I/O to wait for
        # A worker thread, once started, is waited for even when the caller is cancelled (anyio
        # shields the wait). Before it starts, a cancellation stops the call cleanly: callers
        # whose call must happen anyway (cleanup) shield it themselves.
        elif holds_connection:
            await self.finalize(bound)
        else:
            await anyio.to_thread.run_sync(bound)

    async def finalize(self, func: Callable[[], Any]) -> Any:
        """``func()`` in an AnyIO worker thread under the finalizers' own limiter, at most
        :data:`FINALIZER_THREADS` at once on this event loop, whatever the threadpool holds."""
        return await anyio.to_thread.run_sync(func, limiter=self._limiter())

    def _limiter(self) -> anyio.CapacityLimiter:
        try:
            return self._finalizers.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(FINALIZER_THREADS)
            self._finalizers.set(limiter)
            return limiter


def install_connection_listener() -> None:
    """Listen to every session's ``after_begin`` (on SQLAlchemy's ``Session`` class, see
    :func:`sessionscope._lifecycle.install_session_listeners`), noting the connections of
    sessions given to :func:`track_connections`; idempotent."""
    if not event.contains(Session, "after_begin", _began):
        event.listen(Session, "after_begin", _began)


def track_connections(session: AnySession) -> None:
    """Make ``session`` note the connections its transactions begin, for
    :func:`transaction_connections` (after :func:`install_connection_listener`)."""
    session.info[_CONNECTIONS] = None


def _began(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    # A savepoint's connection is its outermost transaction's, noted when that one began it.
    if transaction.parent is not None:
        return
    info = session.info
    if _CONNECTIONS not in info:
        return  # not a session of sessionscope's
    noted: tuple[SessionTransaction, list[Connection]] | None = info[_CONNECTIONS]
    if noted is not None and noted[0] is transaction:
        noted[1].append(connection)
    else:
        info[_CONNECTIONS] = (transaction, [connection])


def transaction_connections(session: Session) -> list[Connection] | None:
    """The connections the session's current transaction has begun (empty: none yet);
    ``None`` when the session was not given to :func:`track_connections`."""
    info = session.info
    if _CONNECTIONS not in info:
        return None
    transaction = session.get_transaction()
    if transaction is None:
        return []
    noted: tuple[SessionTransaction, list[Connection]] | None = info[_CONNECTIONS]
    return noted[1] if noted is not None and noted[0] is transaction else []


def ends_without_io(session: Session) -> bool:
    """Whether ending ``session``'s transaction (commit, rollback, close) does no I/O.

    True when nothing is waiting to be flushed and the driver reports no open transaction on
    any of its connections (``sqlite3`` after reads only: it begins a transaction at the first
    write). Then committing or rolling back and returning the connection to the pool are
    in-memory steps, and a worker thread would cost more than the call itself. Drivers that
    do not report it (``in_transaction``) always get the worker thread.
    """
    if session.new or session.dirty or session.deleted:  # a commit would flush them
        return False
    connections = transaction_connections(session)
    if not connections:
        return False
    for connection in connections:
        # An invalidated connection's .connection would reconnect it: not asked.
        if connection.closed or connection.invalidated:
            return False
        dbapi = connection.connection.dbapi_connection
        if getattr(dbapi, "in_transaction", None) is not False:
            return False
    return True


async def run_to_completion(session: AnySession, method: str) -> None:
    """``session.<method>()``, shielded from cancellation, in a worker thread for a sync session.

    For sessions outside requests (``session_scope``, per-task sessions): their cleanup must
    happen even when the task running them is cancelled.
    """
    bound = getattr(session, method)
    with anyio.CancelScope(shield=True):
        if is_async_session(session):
            await bound()
        else:
            await anyio.to_thread.run_sync(bound)
