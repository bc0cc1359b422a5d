"""Leak detection: a registry of open request sessions and one sweep thread over it.

Nothing is timed per request: opening a session adds an entry to a dict, closing removes it. A
sweep thread wakes a few times per threshold (at most once a second), sets the age gauges and
reports each session that crosses the threshold once, with the *current* stack of whatever
holds it (the request's task, or the thread that opened a sync session). Stacks are captured
only then, never on the request path. When a reported session finally closes, it is reported
as resolved with how long it was held.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from types import FrameType
from typing import TYPE_CHECKING, Any

from ._reporting import error_fields, event_log
from ._request_context import route_template

if TYPE_CHECKING:
    from ._record import SessionRecord


@dataclass(slots=True)
class OpenSession:
    """What the sweep knows about one open session."""

    rs: SessionRecord
    opened_at: float
    thread_id: int
    task: asyncio.Task[Any] | None
    flagged: bool = False


@dataclass(slots=True)
class Suspect:
    """A session that crossed the threshold, as reported."""

    entry: OpenSession
    route: str
    age: float
    stack: str


@dataclass
class LeakRegistry:
    """Open sessions of one middleware, swept by a background thread."""

    threshold: float
    exempt_routes: frozenset[str]
    on_suspect: Callable[[Suspect], None]
    on_sweep: Callable[[int, float], None]
    """Called after every sweep with (sessions over threshold, oldest age in seconds)."""
    route_of: Callable[[Any], str] = route_template
    """A request scope's route label (the reporter's, with router prefixes and mounts)."""
    _open: dict[int, OpenSession] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def interval(self) -> float:
        """Seconds between sweeps: a quarter of the threshold, between 10 ms and 1 s."""
        return max(0.01, min(1.0, self.threshold / 4))

    def add(self, rs: SessionRecord) -> None:
        """Register a newly opened session (from the loop or a worker thread)."""
        # Single dict operations are atomic: no lock on the request path.
        self._open[id(rs)] = OpenSession(
            rs, perf_counter(), threading.get_ident(), rs.running_task()
        )
        if self._thread is None:
            self._start()

    def remove(self, rs: SessionRecord) -> OpenSession | None:
        """Unregister a closed session; the entry tells whether it had been reported."""
        return self._open.pop(id(rs), None)

    def sweep(self) -> list[Suspect]:
        """Check every open session once; report those newly over the threshold."""
        now = perf_counter()
        entries = list(self._open.values())  # one C-level copy: safe against concurrent changes
        oldest = 0.0
        over = 0
        fresh: list[Suspect] = []
        for entry in entries:
            age = now - entry.opened_at
            route = self.route_of(entry.rs.scope)
            if route in self.exempt_routes:
                continue
            oldest = max(oldest, age)
            if age < self.threshold:
                continue
            over += 1
            if not entry.flagged:
                entry.flagged = True
                fresh.append(Suspect(entry, route, age, _stack_of(entry)))
        for suspect in fresh:
            self.on_suspect(suspect)
        self.on_sweep(over, oldest)
        return fresh

    def stop(self) -> None:
        """Stop the sweep thread (it also stops by itself when the registry is collected)."""
        self._stop.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=_sweep_forever,
                args=(weakref.ref(self), self._stop, self.interval),
                name="sessionscope-leak-sweep",
                daemon=True,
            )
            self._thread.start()


def _sweep_forever(ref: weakref.ref[LeakRegistry], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        registry = ref()
        if registry is None:
            return
        try:
            registry.sweep()
        except Exception as exc:  # never let the sweep thread die; the next sweep tries again
            event_log().error("db_session.sweep_failed", exc=exc, **error_fields(exc))
        del registry


def _stack_of(entry: OpenSession) -> str:
    """Where the session is held now: the request task's await chain and, for sync sessions,
    the current stack of the thread that ran its latest statement."""
    parts: list[str] = []
    task = entry.task
    if task is not None and not task.done():
        frames: list[FrameType] = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                frames.append(frame)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames[-20:])
        parts.append("task " + task.get_name() + ":\n" + "".join(summary.format()))
    thread_id = entry.rs.thread
    if thread_id and (task is None or thread_id != entry.thread_id):
        frame = sys._current_frames().get(thread_id)
        if frame is not None:
            stack = "".join(traceback.format_stack(frame, limit=20))
            parts.append(f"thread {thread_id} (latest statement):\n{stack}")
    return "\n".join(parts)
