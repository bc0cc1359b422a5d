"""The request session's state machine: created, decided, closed; it emits the record.

Every state a request session goes through, and every commit or rollback, is in this module:

* **created** lazily, the first time the request asks for it (``request.state.<key>``);
  creating it checks out no connection.
* **decided** when the application sends ``http.response.start``, before that message is
  forwarded: ``commit_on(status)`` commits, anything else rolls back. A failed commit rolls
  back and replaces the response with a complete ``500``.
* **late**: after the decision the session stays usable until the application returns
  (streaming bodies, background tasks); what it does then runs in a new transaction that is
  rolled back at close unless the application commits it itself. Such a late transaction of
  a sync engine takes a pool slot again, held until it ends or the request does.
* **closed** when the application returns, raises or is cancelled. Cleanup is shielded from
  cancellation; cleanup errors are reported, never raised over the application's own error.

Sync and async sessions share this code; :class:`~sessionscope._session_calls.SessionCalls`
decides how each call runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, NoReturn

import anyio
import anyio.from_thread
import anyio.lowlevel
from sqlalchemy import event
from sqlalchemy.exc import IllegalStateChangeError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from . import _outcome as oc
from ._decision_gate import DecisionGate
from ._policy import CommitPolicy, rollback_reason
from ._record import REQUEST_KEY
from ._request_context import route_template
from ._request_state import RequestState
from ._responses import error_response
from ._session_calls import (
    SessionCalls,
    install_connection_listener,
    track_connections,
    transaction_connections,
)
from ._slots import LoopSlots, SessionSlots
from ._source import AnySession, SessionSource
from ._statements import StatementTally
from .errors import SessionClosedError
from .hooks import CommitHooks

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from ._reporting import Reporter

_CHECKOUT_STARTED: Final = "sessionscope.checkout_started"
IDLE_WAIT_SECONDS: Final = 30.0
"""How long closing a request session waits for another task or thread to stop using it."""
_CLOSED_BY: Final = "sessionscope.closed_by"
"""``Session.info`` key marking a closed request session: (settings, matched route object) of
its request."""


class Phase(enum.IntEnum):
    """Where a request session is in its life."""

    RUNNING = 0
    """The application has not started its response; nothing is decided."""
    DECIDED = 1
    """``http.response.start`` was seen; the request transaction is committed or rolled back."""
    CLOSED = 2
    """The application returned; the session is closed and must not be used again."""


# Module constants for the hot path: ``Phase.RUNNING`` is an enum class attribute lookup that
# costs ten times a global's (about 50 ns on Python 3.11), paid several times a request.
_RUNNING: Final = Phase.RUNNING
_DECIDED: Final = Phase.DECIDED
_CLOSED: Final = Phase.CLOSED


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What every request of one middleware shares (immutable, built at construction)."""

    name: str
    state_key: str
    source: SessionSource
    commit_on: CommitPolicy
    calls: SessionCalls
    reporter: Reporter
    create_lock: threading.Lock
    slots: SessionSlots | None
    replica: SessionSource | None = None
    """Where requests with a read-only method get their session (``replica_engine=``)."""
    replica_slots: SessionSlots | None = None
    read_only_methods: frozenset[str] = frozenset()
    gated: bool = False
    """Hold statements back while the decision runs (a middleware inside runs the application
    in a task of its own: see :mod:`sessionscope._decision_gate`)."""

    def refuse(self, matched: object) -> NoReturn:
        """Raise for a request that asks for its session after it finished (``matched``: its
        route object)."""
        raise closed_error(self, route_template({"route": matched}), "requested")


class RequestSession(StatementTally):
    """One HTTP request's session and the decisions made about it.

    It is also the request's statement tally: the engine listener counts into it.
    """

    # Class-level defaults, as in StatementTally: a request that never opens its session
    # stores only what __init__ sets.
    session: AnySession | None = None
    slots: LoopSlots | None = None
    """This event loop's slots of a sync engine with a bounded pool (else ``None``)."""
    slot: LoopSlots | None = None
    """The slots this request holds one of (sync engines with a bounded pool)."""
    admitting: bool = False
    phase: Phase = _RUNNING
    status: int | None = None
    outcome: str | None = None
    reason: str | None = None
    replaced: bool = False
    request_id: str | None = None
    hooks: CommitHooks | None = None
    span: Any = None
    opened_at: float = 0.0
    closed_at: float = 0.0
    commit_seconds: float | None = None
    """How long the decided commit took (reported with the close)."""
    gate: DecisionGate | None = None
    """Keeps statements and the decision apart (``settings.gated`` only)."""
    slot_timeout: PoolTimeoutError | None = None
    """The admission's timeout, if it gave up waiting for a pool slot."""
    disconnected: bool = False
    """The application received ``http.disconnect`` before its response started: roll back."""

    state: RequestState
    """The request's state, where the session is remembered once created (set by the
    middleware right after construction)."""

    def __init__(
        self, settings: SessionSettings, scope: Scope, send: Send, receive: Receive
    ) -> None:
        self.loop_thread = threading.get_ident()  # created by the middleware, on the loop
        self.settings = settings
        self.scope = scope
        self._send = send
        self._receive = receive
        slots: SessionSlots | None
        if settings.replica is not None and scope["method"] in settings.read_only_methods:
            self.source, slots = settings.replica, settings.replica_slots
            self.pool = self.source.pool
            self.read_only = True
        else:
            self.source = source = settings.source
            slots = settings.slots
            engine = source.engine
            if engine is not None:
                self.pool = engine.pool
        if slots is not None:
            self.slots = slots.here()

    # -- created -------------------------------------------------------------------------

    def open(self) -> AnySession:
        """The request's session, created on first call (from any thread).

        First asked for in a worker thread, it is admitted to the pool's capacity there: at
        once if a slot is free, else waiting on the event loop while the threadpool has one
        more thread (see :mod:`sessionscope._slots`).
        """
        slots = self.slots
        if slots is not None and self.session is None and self._admitting(_RUNNING):
            self._admit_here(slots)
        with self.settings.create_lock:
            if self.session is None:
                if self.phase is _CLOSED:
                    raise closed_error(self.settings, route_template(self.scope), "requested")
                session = self.source.new_session()
                session.info[REQUEST_KEY] = self
                track_connections(session)
                if self.settings.gated:
                    self.gate = DecisionGate(self.loop_thread, is_async=self.source.is_async)
                    self.gate.watch(session)
                self.opened_at = perf_counter()
                self.session = session
                self.state.remember(self.settings.state_key, session)
                self.settings.reporter.opened(self)
        return self.session

    async def open_async(self) -> AnySession:
        """The request's session, first waiting on the loop for a pool slot (sync engines)."""
        slots = self.slots
        if slots is not None and self.session is None and self._admitting(_RUNNING):
            try:
                if not slots.try_acquire():
                    await self._wait_for_slot(slots.acquire)
                self.slot = slots
            finally:
                self.admitting = False
        return self.open()

    def admit_late(self) -> None:
        """Take a pool slot again for a transaction begun after the decision (a streaming body
        using the session), from the thread beginning it; held until that transaction ends
        (:meth:`release_late`) or the request does.

        The decision gave the request's slot back with its connection. Without a slot again,
        the late transaction's connection would not be counted: requests admitted in its place
        would fill the threadpool waiting for it, and the stream would wait for a thread.
        """
        slots = self.slots
        if slots is not None and self._admitting(_DECIDED):
            self._admit_here(slots)

    def release_late(self) -> None:
        """Give the slot of a late transaction back when it ends (the application committed
        or rolled it back, and its connection went back to the pool): on the loop, or from an
        AnyIO worker thread through it; from any other thread, when the request ends."""
        if threading.get_ident() == self.loop_thread:
            self._release_slot()
            return
        # Not an AnyIO worker thread (RuntimeError): withdraw() gives it back at the end.
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(self._release_slot)

    def _admitting(self, phase: Phase) -> bool:
        """Claim the admission of this request's session to a pool slot: ``False`` when it
        holds one, is not in ``phase``, or another thread or task is being admitted (two
        first uses at once must not take two slots, one of which nobody would give back)."""
        with self.settings.create_lock:
            if self.slot is not None or self.admitting or self.phase is not phase:
                return False
            self.admitting = True
            return True

    def _admit_here(self, slots: LoopSlots) -> None:
        """Take a slot for the admission claimed (see :meth:`_admitting`), in this thread: at
        once if one is free, else, in a worker thread, waiting on the event loop while the
        threadpool has one more thread (see :mod:`sessionscope._slots`)."""
        try:
            if slots.try_acquire():
                self.slot = slots
            elif not _on_event_loop():
                try:
                    anyio.from_thread.run(self._wait_for_slot, slots.acquire_lending_thread)
                except RuntimeError:
                    pass  # not an AnyIO worker thread: the pool checkout itself will wait
                else:
                    self.slot = slots
        finally:
            self.admitting = False

    async def _wait_for_slot(self, acquire: Callable[[], Awaitable[None]]) -> None:
        """Wait for a pool slot with ``acquire``, counted as a pending checkout."""
        reporter = self.settings.reporter
        reporter.waiting(+1)
        started = perf_counter()
        try:
            await acquire()
        except PoolTimeoutError as exc:
            reporter.slot_timeout(perf_counter() - started)
            self.slot_timeout = exc  # counted: not again when the request answers 503
            raise
        finally:
            reporter.waiting(-1)
        reporter.slot_waited(perf_counter() - started)

    def _release_slot(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release()

    # -- decided ---------------------------------------------------------------------------

    async def receive(self) -> Message:
        """The ``receive`` the application sees: remembers a disconnect seen before the
        response started (servers do not cancel the application when the client leaves)."""
        message = await self._receive()
        if message["type"] == "http.disconnect" and self.phase is _RUNNING:
            self.disconnected = True
        return message

    def send(self, message: Message) -> Awaitable[None]:
        """The ``send`` the application sees: decides at ``http.response.start``.

        A plain function returning what the application awaits: a message that needs no
        decision (every message of a request that never opened its session, and the body)
        goes straight to the server's ``send``, without a coroutine of its own.
        """
        if self.phase is _RUNNING and message["type"] == "http.response.start":
            if self.session is not None:
                return self._decide_and_send(message)
            self.status = message["status"]
            self._decided()
        elif self.replaced:
            return _dropped()
        return self._send(message)

    async def _decide_and_send(self, message: Message) -> None:
        """Commit or roll back for the response start, then send it (or a ``500`` instead)."""
        self.status = status = message["status"]
        # A cancellation held back while a worker thread ran (anyio delivers it at the next
        # checkpoint) must turn into a rollback here, not come after a commit.
        await anyio.lowlevel.checkpoint_if_cancelled()
        gate = self.gate
        if gate is not None:
            await gate.close()  # no statement of the application's runs during the decision
        try:
            committed = await self._decide(status)
            self._decided()
        finally:
            if gate is not None:
                gate.open()
        if not committed:
            self.replaced = True
            await self._send_all(error_response(500))
            return
        if self.hooks is not None and self.outcome == oc.COMMIT:
            await self.hooks.run(self.hooks.before, self._hook_failed)
        await self._send(message)

    def _decided(self) -> None:
        self.phase = _DECIDED
        self.late = True
        if self.slot is not None:
            self._release_slot()

    async def _decide(self, status: int) -> bool:
        """Commit or roll back for ``status``; ``False`` if the commit failed."""
        sync = self._sync_session()
        if not sync.in_transaction():
            self.outcome = oc.UNUSED
            return True
        if self.disconnected or not self.settings.commit_on(status):
            reason = oc.DISCONNECTED if self.disconnected else rollback_reason(status)
            self.outcome, self.reason = oc.ROLLBACK, reason
            await self._rollback(self.reason)
            return True
        started = perf_counter()
        try:
            await self._call("commit")
        except Exception as exc:
            self.outcome, self.reason = oc.ROLLBACK, oc.COMMIT_ERROR
            self.settings.reporter.failed(self, oc.PHASE_COMMIT, exc)
            await self._rollback(oc.COMMIT_ERROR)
            return False
        self.outcome = oc.COMMIT
        self.commit_seconds = perf_counter() - started
        return True

    async def _rollback(self, reason: str) -> None:
        try:
            await self._call("rollback")
        except Exception as exc:
            self.settings.reporter.failed(self, oc.PHASE_ROLLBACK, exc)
            await self._discard()
            return
        self.settings.reporter.rolled_back(self, reason)

    # -- closed ----------------------------------------------------------------------------

    async def finish(self, exc: BaseException | None) -> None:
        """End the request: roll back what is undecided or late, close, report. Never raises."""
        if not self.withdraw():
            await self.close(exc)

    def withdraw(self) -> bool:
        """Give the slot back and withdraw from the request state; ``True`` when the request
        never opened its session (it is closed now, and :meth:`close` has nothing to do)."""
        if self.slot is not None:
            self._release_slot()
        # From now on the request state must not reach back to this object (no cycle): the
        # matched route object, not the scope, tells a late request for the session its route.
        settings = self.settings
        self.state.withdraw(settings.state_key, settings, self.scope.get("route"))
        if self.session is None:
            self.phase = _CLOSED
            return True
        return False

    async def close(self, exc: BaseException | None) -> None:
        """After :meth:`withdraw`: end the opened session's transaction, close it, report."""
        sync = self._sync_session()
        sync.info.pop(REQUEST_KEY, None)
        # The matched route object: its template is looked up only if the session is misused.
        sync.info[_CLOSED_BY] = (self.settings, self.scope.get("route"))
        if sync.in_transaction():
            # Shielded: cleanup of a cancelled request must still run (a worker-thread call
            # checks for cancellation before it starts, and would otherwise never close).
            with anyio.CancelScope(shield=True):
                await self._close_transaction(sync, exc)
        else:
            if self.phase is _RUNNING:
                self.outcome = oc.UNUSED
            elif self.outcome == oc.UNUSED and self.statements:
                self._used_late_only()
            self.phase = _CLOSED
            if sync.identity_map:
                # No transaction, so no I/O: detach the loaded objects, inline. (Pending
                # objects would have begun a transaction: an untouched session needs nothing.)
                sync.close()
        self.closed_at = perf_counter()
        self.settings.reporter.closed(self)
        if self.hooks is not None and self.outcome == oc.COMMIT and self.hooks.after:
            with anyio.CancelScope(shield=True):  # the data is committed: its hooks must run
                await self.hooks.run(self.hooks.after, self._hook_failed)

    async def _close_transaction(self, sync: Session, exc: BaseException | None) -> None:
        """Roll back the undecided or late transaction and return its connection."""
        reason: str | None = None
        if self.phase is _RUNNING:
            reason = oc.DISCONNECTED if self.disconnected else _undecided_reason(exc)
            self.outcome, self.reason = oc.ROLLBACK, reason
        elif self._wrote_late(sync):
            reason = oc.LATE_WRITE
            self.settings.reporter.late_write(self)
            if self.outcome in (None, oc.UNUSED):
                self.outcome, self.reason = oc.ROLLBACK, reason
        elif self.outcome == oc.UNUSED:
            reason = self._used_late_only()
        self.phase = _CLOSED
        try:
            # close() rolls back the transaction and returns its connection: one call.
            await self._close_when_idle()
        except Exception as exc_close:
            self.settings.reporter.failed(self, oc.PHASE_CLOSE, exc_close)
            await self._discard()
        else:
            if reason is not None:
                self.settings.reporter.rolled_back(self, reason)

    def _used_late_only(self) -> str | None:
        """Classify a session whose statements all ran after the decision (a streamed body):
        it was used, so its outcome is what the status decided; the rollback reason, if any."""
        status = self.status
        if status is None or self.settings.commit_on(status):
            self.outcome = oc.COMMIT
            return None
        self.outcome, self.reason = oc.ROLLBACK, rollback_reason(status)
        return self.reason

    def unavailable(self, exc: PoolTimeoutError) -> None:
        """A pool timeout before the response started: reported, and the status is ``503``
        (the session, closed next, is rolled back for ``pool_timeout``)."""
        if self.session is not None:
            # No longer pending (see _checkout_starts) when the timeout is counted and logged.
            _checkout_abandoned(self.session.info)
        self.settings.reporter.pool_timeout(self, exc)
        self.status = 503

    async def respond_unavailable(self) -> None:
        """Answer ``503`` with ``Retry-After`` (after :meth:`unavailable` and the close)."""
        self.phase = _DECIDED
        await self._send_all(error_response(503))

    # -- helpers ---------------------------------------------------------------------------

    def _hook_failed(self, hook: object, exc: BaseException) -> None:
        self.settings.reporter.hook_failed(self, hook, exc)

    @property
    def started(self) -> bool:
        """Whether the client was sent (or is being sent) a response start."""
        return self.phase is not _RUNNING

    @property
    def duration(self) -> float:
        """Seconds from creation to close (or to now, while open)."""
        end = self.closed_at or perf_counter()
        return end - self.opened_at

    def _sync_session(self) -> Session:
        session = self.session
        assert session is not None
        return session if isinstance(session, Session) else session.sync_session

    def holds_connection(self) -> bool:
        """Whether the session's transaction has checked out a connection."""
        if self.session is None:
            return False
        connections = transaction_connections(self._sync_session())
        return connections is None or bool(connections)

    async def _call(self, method: str) -> None:
        session = self.session
        assert session is not None
        calls = self.settings.calls
        # Async sessions are awaited whether or not they hold a connection: no need to ask.
        holds = not calls.is_async and self.holds_connection()
        await calls.call(session, method, holds_connection=holds)

    async def _close_when_idle(self) -> None:
        """``close()``, once no other task or thread is using the session.

        A task the application left running (``asyncio.gather`` does not wait for the other
        task when one fails) may still be checking out the session's connection or running a
        statement on it. Closing then fails (or races the statement) and, if nothing retries,
        the connection stays checked out for good inside its transaction. So the close waits,
        up to ``IDLE_WAIT_SECONDS``, for that use to end. An ordinary request, whose session
        nobody else uses, closes at once.
        """
        waited, delay = 0.0, 0.001
        while True:
            if self.busy_connection is None or waited >= IDLE_WAIT_SECONDS:
                try:
                    await self._call("close")
                    return
                except IllegalStateChangeError:  # another task is inside a session method
                    if waited >= IDLE_WAIT_SECONDS:
                        raise
            await anyio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.05)

    def _wrote_late(self, sync: Session) -> bool:
        return bool(self.late_writes or sync.new or sync.dirty or sync.deleted)

    async def _discard(self) -> None:
        """Last resort after a failed rollback/close: invalidate, so no connection stays out."""
        try:
            await self._call("invalidate")
        except Exception as exc:
            self.settings.reporter.failed(self, oc.PHASE_CLOSE, exc)

    async def _send_all(self, messages: list[Message]) -> None:
        for message in messages:
            await self._send(message)


def closed_error(settings: SessionSettings, route: str, verb: str) -> SessionClosedError:
    """Report a use after close and build the error that tells the user what to do instead."""
    settings.reporter.used_after_close(settings.name, route)
    return SessionClosedError(
        f"the request session {settings.state_key!r} of database {settings.name!r} "
        f"(route {route}) was {verb} after its request finished; work that outlives the "
        "request must open its own session, e.g. `with session_scope(engine) as session:`"
    )


async def _dropped() -> None:
    """A message sent after the response was replaced by a ``500``: it is dropped."""


def _on_event_loop() -> bool:
    return asyncio._get_running_loop() is not None


def _undecided_reason(exc: BaseException | None) -> str:
    if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class()):
        return oc.CANCELLED
    if isinstance(exc, PoolTimeoutError):
        return oc.POOL_TIMEOUT
    return oc.EXCEPTION


def _admit_late(session: Session, transaction: Any) -> None:
    request: RequestSession | None = session.info.get(REQUEST_KEY)
    if request is not None and request.phase is _DECIDED and transaction.parent is None:
        request.admit_late()


def _release_late(session: Session, transaction: Any) -> None:
    request: RequestSession | None = session.info.get(REQUEST_KEY)
    if (
        request is not None
        and request.slot is not None
        and request.phase is _DECIDED
        and transaction.parent is None
    ):
        request.release_late()


def _checkout_starts(session: Session, transaction: Any) -> None:
    """A request's session began its outermost transaction without a pool slot to wait for
    (async engines, pools sessionscope does not bound): it is about to ask the pool for a
    connection. Counted as pending until ``after_begin`` (:func:`_checkout_done`).

    SQLAlchemy has no public event at the start of a checkout; the transaction is created at
    the session's first use, just before its first connection is asked for. The wait measured
    includes opening a new connection when the pool has to, and, for a session whose first use
    is ``add()``, the time until its first flush or statement.
    """
    if transaction.parent is not None:
        return
    request: RequestSession | None = session.info.get(REQUEST_KEY)
    if request is not None and request.slots is None:
        reporter = request.settings.reporter
        session.info[_CHECKOUT_STARTED] = (reporter, perf_counter())
        reporter.waiting(+1)


def _checkout_done(session: Session, transaction: Any, connection: Any) -> None:
    """The first connection of the transaction counted by :func:`_checkout_starts` is
    checked out and begun: no longer pending, and its wait observed."""
    noted: tuple[Reporter, float] | None = session.info.pop(_CHECKOUT_STARTED, None)
    if noted is not None:
        reporter, started = noted
        reporter.waiting(-1)
        reporter.slot_waited(perf_counter() - started)


def _transaction_ended(session: Session, transaction: Any) -> None:
    """The transaction ended without a connection (its checkout failed, or it never needed
    one): no longer pending."""
    if transaction.parent is None:
        _checkout_abandoned(session.info)


def _checkout_abandoned(info: dict[Any, Any]) -> None:
    """The checkout counted by :func:`_checkout_starts` (if still pending) is given up: no
    longer pending. A timeout is observed when the request answers 503
    (:meth:`Reporter.pool_timeout`)."""
    noted: tuple[Reporter, float] | None = info.pop(_CHECKOUT_STARTED, None)
    if noted is not None:
        noted[0].waiting(-1)


def _refuse_if_closed(session: Session, transaction: Any) -> None:
    closed_by: tuple[SessionSettings, object] | None = session.info.get(_CLOSED_BY)
    if closed_by is not None and transaction.parent is None:
        settings, matched = closed_by
        raise closed_error(settings, route_template({"route": matched}), "used")


_SESSION_LISTENERS: Final[tuple[tuple[str, Callable[..., None]], ...]] = (
    ("after_transaction_create", _refuse_if_closed),
    ("after_transaction_create", _admit_late),
    ("after_transaction_create", _checkout_starts),
    ("after_begin", _checkout_done),
    ("after_transaction_end", _release_late),
    ("after_transaction_end", _transaction_ended),
)


def install_session_listeners() -> None:
    """Listen to the events request sessions rely on: a closed session refuses to begin a
    transaction, a transaction begun after the decision takes a pool slot again, and a
    first checkout counts as pending. Idempotent.

    The listeners are on SQLAlchemy's ``Session`` class, which every session class derives
    from, and act only on sessions whose ``info`` marks them as request sessions. Not on the
    ``sessionmaker``: SQLAlchemy remembers a class-level listener by the ``id()`` of what was
    listened to and never forgets it, so ``event.contains`` answers yes for a new
    ``sessionmaker`` created where a freed one was, and its sessions would go unguarded.
    """
    for identifier, listener in _SESSION_LISTENERS:
        if not event.contains(Session, identifier, listener):
            event.listen(Session, identifier, listener)
    install_connection_listener()
