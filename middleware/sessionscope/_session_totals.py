"""What every session's open and close add to the metrics.

A closed session changes seven series: its route's ``sessions_closed_total{outcome}``,
``session_held_seconds_total`` and ``statements_total``, and its database's
``session_duration_seconds{outcome}``, ``session_statements``,
``session_commit_duration_seconds`` and ``sessions_open``. :meth:`SessionTotals.closed` updates
them through prometheus_client's public ``inc``, ``dec`` and ``observe``, so a scrape sees every
close made before it, in a single process and under multiprocess mode alike.
"""

from __future__ import annotations

from typing import Any


class RouteTotals:
    """One route's children: closed sessions by outcome, seconds held, statements."""

    __slots__ = ("held_child", "outcome_children", "stmt_child")

    def __init__(self, closed: dict[str, Any], held: Any, statements: Any) -> None:
        self.outcome_children = closed
        self.held_child = held
        self.stmt_child = statements


class SessionTotals:
    """One database's session children, and the updates of a session's open and close."""

    __slots__ = ("commit", "duration", "open_child", "statements")

    def __init__(
        self,
        *,
        open_gauge: Any,
        duration: dict[str, Any],
        statements: Any,
        commit: Any,
    ) -> None:
        self.open_child = open_gauge
        self.duration = duration
        self.statements = statements
        self.commit = commit

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
