"""The record of a request session that observers (logs, metrics, leaks, spans) read.

The state machine (:class:`sessionscope._lifecycle.RequestSession`) emits its events with
itself as the record; the observers type against the protocols here, never against the state
machine, so nothing imports the state machine back. Protocols cost nothing at run time: no
object is built per request to carry the record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    import asyncio

    from sqlalchemy.exc import TimeoutError as PoolTimeoutError
    from starlette.types import Scope

    from ._source import AnySession

REQUEST_KEY: Final = "sessionscope.request"
"""``Session.info`` key of the open request session's state machine."""


class SessionRecord(Protocol):
    """What observers read of one request session (the state machine satisfies it)."""

    request_id: str | None
    """The request's id, filled in by the first event that needs it."""
    span: Any
    """The session's OpenTelemetry span while it is open (``None`` without tracing)."""

    @property
    def scope(self) -> Scope:
        """The request's ASGI scope (route, method, headers)."""

    @property
    def session(self) -> AnySession | None:
        """The session, once the request created it."""

    @property
    def status(self) -> int | None:
        """The response status, once the response started."""

    @property
    def outcome(self) -> str | None:
        """``committed``, ``rolled_back`` ... once decided (see :mod:`sessionscope._outcome`)."""

    @property
    def reason(self) -> str | None:
        """Why it was rolled back, if it was."""

    @property
    def duration(self) -> float:
        """Seconds from creation to close (or to now, while open)."""

    @property
    def statements(self) -> int:
        """Statements the session ran."""

    @property
    def commit_seconds(self) -> float | None:
        """How long the decided commit took."""

    @property
    def closed_at(self) -> float:
        """``perf_counter()`` at close (0 while open)."""

    @property
    def slot_timeout(self) -> PoolTimeoutError | None:
        """The admission's timeout, if it gave up waiting for a pool slot."""

    @property
    def thread(self) -> int:
        """The thread that ran the latest statement (0 before the first)."""

    def holds_connection(self) -> bool:
        """Whether the session's transaction has checked out a connection."""

    def running_task(self) -> asyncio.Task[Any] | None:
        """The task of the request, when it runs in one."""


class LeakEntry(Protocol):
    """An open session as the leak observer tracks it."""

    @property
    def rs(self) -> SessionRecord:
        """The session's record."""

    @property
    def flagged(self) -> bool:
        """Whether it was reported as a suspected leak."""


class LeakSuspect(Protocol):
    """A session that crossed the leak threshold, as reported."""

    @property
    def entry(self) -> LeakEntry:
        """The tracked session."""

    @property
    def route(self) -> str:
        """Its route template."""

    @property
    def age(self) -> float:
        """Seconds it has been open."""

    @property
    def stack(self) -> str:
        """Where it is held now."""


class LeakTracker(Protocol):
    """The leak observer: told of each session's open and close."""

    def add(self, rs: SessionRecord) -> None:
        """A session opened."""

    def remove(self, rs: SessionRecord) -> LeakEntry | None:
        """A session closed; its entry, if it was tracked."""


class PoolObserver(Protocol):
    """The pool observer: told of waits for and timeouts of a pool slot."""

    @property
    def multiprocess(self) -> bool:
        """Whether its gauges are set rather than read at scrape time."""

    def observe_wait(self, waited: float) -> None:
        """A wait for a pool slot that ended with one."""

    def record_timeout(self, waited: float) -> None:
        """A wait for a pool slot that gave up."""

    def record_pool_timeout(self) -> None:
        """A checkout the pool itself gave up on."""

    def refresh(self) -> None:
        """Set its gauges from the pool now."""
