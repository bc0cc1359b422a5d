"""What every session's open and close add to the metrics: the one place they are recorded.

A closed session changes seven series: its route's ``sessions_closed_total{outcome}``,
``session_held_seconds_total`` and ``statements_total``, and its database's
``session_duration_seconds{outcome}``, ``session_statements``,
``session_commit_duration_seconds`` and ``sessions_open``. :class:`RouteTotals` and
:class:`SessionTotals` resolve their children from the catalogue themselves, and
:meth:`SessionTotals.closed` updates them through prometheus_client's public ``inc``, ``dec``
and ``observe``, so a scrape sees every close made before it, in a single process and under
multiprocess mode alike. A new per-session metric is a catalogue entry plus its child here and
its update in :meth:`SessionTotals.closed` (see the architecture page).
"""

from __future__ import annotations

from typing import Any, Protocol

from . import _outcome as oc
from . import catalogue as cat


class Families(Protocol):
    """The metric families of one registry and namespace, by catalogue entry."""

    def __getitem__(self, metric: cat.Metric) -> Any: ...


class RouteTotals:
    """One route's children: closed sessions by outcome, seconds held, statements."""

    __slots__ = ("held_child", "outcome_children", "stmt_child")

    def __init__(self, families: Families, db: str, route: str) -> None:
        closed = families[cat.SESSIONS_CLOSED]
        self.outcome_children = {o: closed.labels(db, route, o) for o in oc.OUTCOMES}
        self.held_child = families[cat.SESSION_HELD].labels(db, route)
        self.stmt_child = families[cat.STATEMENTS].labels(db, route)


class SessionTotals:
    """One database's session children, and the updates of a session's open and close."""

    __slots__ = ("commit", "duration", "open_child", "statements")

    def __init__(self, families: Families, db: str) -> None:
        self.open_child = families[cat.SESSIONS_OPEN].labels(db)
        duration = families[cat.SESSION_DURATION]
        self.duration = {o: duration.labels(db, o) for o in oc.OUTCOMES}
        self.statements = families[cat.SESSION_STATEMENTS].labels(db)
        self.commit = families[cat.SESSION_COMMIT_DURATION].labels(db)

    def opened(self) -> None:
        """A session was created."""
        self.open_child.inc()

    def closed(
        self,
        route: RouteTotals,
        outcome: str,
        seconds: float,
        statements: int | None,
        commit_seconds: float | None,
    ) -> None:
        """A session of ``route`` closed; ``statements`` is ``None`` where they are not
        counted (per-task sessions), ``commit_seconds`` where nothing was committed."""
        route.outcome_children[outcome].inc()
        route.held_child.inc(seconds)
        self.duration[outcome].observe(seconds)
        if statements is not None:
            if statements:
                route.stmt_child.inc(statements)
            self.statements.observe(statements)
        if commit_seconds is not None:
            self.commit.observe(commit_seconds)
        self.open_child.dec()
