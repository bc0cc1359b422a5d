"""What every session's open and close add to the metrics, in one batched update each.

A closed session changes seven series: its route's ``sessions_closed_total{outcome}``,
``session_held_seconds_total`` and ``statements_total``, and its database's
``session_duration_seconds{outcome}``, ``session_statements``,
``session_commit_duration_seconds`` and ``sessions_open``. :meth:`SessionTotals.closed` adds
them to plain numbers in one call under the batch's lock; :meth:`SessionTotals.take` and
:meth:`SessionTotals.write` hand them to the children at the next flush
(:mod:`.metric_batch`). Where the batch writes at once (multiprocess mode), or a histogram
child cannot be written in bulk, the children are updated directly instead.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from .metric_batch import Buckets, MetricBatch, Pending, bulk_writable, write_histogram


class RouteTotals(Pending):
    """One route's pending session counts: closed by outcome, seconds held, statements."""

    __slots__ = ("closed", "held", "held_child", "outcome_children", "statements", "stmt_child")

    def __init__(
        self, batch: MetricBatch, closed: dict[str, Any], held: Any, statements: Any
    ) -> None:
        super().__init__(batch)
        self.outcome_children = closed
        self.held_child = held
        self.stmt_child = statements
        self.closed = dict.fromkeys(closed, 0)
        self.held = 0.0
        self.statements = 0

    def take(self) -> tuple[dict[str, int], float, int]:
        taken = self.closed, self.held, self.statements
        self.closed, self.held, self.statements = dict.fromkeys(self.outcome_children, 0), 0.0, 0
        self.is_dirty = False
        return taken

    def write(self, update: tuple[dict[str, int], float, int]) -> None:
        closed, held, statements = update
        for outcome, count in closed.items():
            if count:
                self.outcome_children[outcome].inc(count)
        if held:
            self.held_child.inc(held)
        if statements:
            self.stmt_child.inc(statements)


class SessionTotals(Pending):
    """One database's pending session figures, and the one-call updates of open and close."""

    __slots__ = ("commit", "direct", "duration", "open", "open_child", "statements")

    def __init__(
        self,
        batch: MetricBatch,
        *,
        open_gauge: Any,
        duration: dict[str, Any],
        statements: Any,
        commit: Any,
    ) -> None:
        super().__init__(batch)
        histograms = [*duration.values(), statements, commit]
        self.direct = batch.immediate or not all(bulk_writable(h) for h in histograms)
        """Update the children at once (multiprocess mode, or histograms of another shape)."""
        self.open_child = open_gauge
        self.open = 0
        self.duration = {outcome: Buckets(child) for outcome, child in duration.items()}
        self.statements = Buckets(statements)
        self.commit = Buckets(commit)

    def opened(self) -> None:
        """A session was created."""
        if self.direct:
            self.open_child.inc()
            return
        with self.batch.lock:
            self.open += 1
            if not self.is_dirty:
                self.is_dirty = True
                self.batch.dirty.append(self)

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
        if self.direct:
            route.outcome_children[outcome].inc()
            route.held_child.inc(seconds)
            self.duration[outcome].child.observe(seconds)
            if statements is not None:
                if statements:
                    route.stmt_child.inc(statements)
                self.statements.child.observe(statements)
            if commit_seconds is not None:
                self.commit.child.observe(commit_seconds)
            self.open_child.dec()
            return
        batch = self.batch
        with batch.lock:
            route.closed[outcome] += 1
            route.held += seconds
            if not route.is_dirty:
                route.is_dirty = True
                batch.dirty.append(route)
            # Inline observations (see Buckets): a call each would cost more than the update.
            buckets = self.duration[outcome]
            buckets.counts[bisect_left(buckets.bounds, seconds)] += 1
            buckets.total += seconds
            if statements is not None:
                route.statements += statements
                buckets = self.statements
                buckets.counts[bisect_left(buckets.bounds, statements)] += 1
                buckets.total += statements
            if commit_seconds is not None:
                buckets = self.commit
                buckets.counts[bisect_left(buckets.bounds, commit_seconds)] += 1
                buckets.total += commit_seconds
            self.open -= 1
            if not self.is_dirty:
                self.is_dirty = True
                batch.dirty.append(self)

    def take(self) -> tuple[int, list[tuple[Any, tuple[list[int], float]]]]:
        histograms = [*self.duration.values(), self.statements, self.commit]
        taken = self.open, [(b.child, b.take()) for b in histograms]
        self.open = 0
        self.is_dirty = False
        return taken

    def write(self, update: tuple[int, list[tuple[Any, tuple[list[int], float]]]]) -> None:
        opened, histograms = update
        if opened:
            self.open_child.inc(opened)
        for child, (counts, total) in histograms:
            if any(counts):
                write_histogram(child, counts, total)
