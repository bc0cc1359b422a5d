"""What metrics and logging cost per database request, measured closely enough to judge 10 µs.

The in-process table cannot: a database request there takes 0.7 to 1.3 ms, and from one batch to
the next the same contender moves by ±5 % (thread hops, the PostgreSQL server on the other
core), several times the 10 µs in question. Here sessionscope with metrics and logging on and
off serve the same database route with nothing else in the way: an ``async def`` route that
reads one row through the request's sync ``Session`` from an in-memory SQLite database behind
an ordinary ``QueuePool``, so no thread hop, no socket and no file. The two apps alternate in
pairs of batches (the order flips every pair), and the figure is the median over the pairs of
on minus off, in CPU µs per request, with its interquartile range.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from time import process_time_ns
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import create_engine, select
from sqlalchemy.pool import QueuePool

from .contenders.sessionscope_app import off_supported
from .database import SEED_ROWS, item_id, items, metadata
from .driver import AsgiDriver

PATH = "/inline/items/{item_id}"
_READ = select(items.c.id, items.c.name)


@dataclass(frozen=True)
class OverheadSettings:
    """How much to measure."""

    pairs: int = 200
    requests: int = 300
    """Requests per batch (each pair is one batch of each app)."""
    warmup: int = 200


@dataclass
class OverheadResult:
    """On minus off, per pair of batches, in CPU µs per request."""

    differences: list[float]
    off_cpu: list[float]
    requests: int

    @property
    def median(self) -> float:
        """The median difference."""
        return statistics.median(self.differences)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The first and third quartiles of the differences."""
        q1, _, q3 = statistics.quantiles(self.differences, n=4)
        return q1, q3

    @property
    def off_median(self) -> float:
        """CPU µs per request with metrics and logging off."""
        return statistics.median(self.off_cpu)


def _engine(name: str) -> Any:
    """A QueuePool engine on a shared in-memory SQLite database, seeded like the others."""
    engine = create_engine(
        f"sqlite:///file:{name}?mode=memory&cache=shared&uri=true",
        poolclass=QueuePool,
        pool_size=2,
    )
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(items.insert(), [{"name": f"item-{i}"} for i in range(1, SEED_ROWS + 1)])
    return engine


def build_app(name: str, *, observed: bool) -> tuple[FastAPI, Any]:
    """The hop-free database route's app, sessionscope's metrics and logging on or off."""
    from prometheus_client import CollectorRegistry

    from sessionscope import DBSessionMiddleware

    engine = _engine(name)
    app = FastAPI()

    @app.get(PATH)
    async def read_inline(item_id: int, request: Request) -> dict[str, Any]:
        row = request.state.db.execute(_READ.where(items.c.id == item_id)).one()
        return {"id": row.id, "name": row.name}

    options: dict[str, Any] = (
        {"registry": CollectorRegistry()}
        if observed
        else {"metrics": False, "closed_log_level": None}
    )
    app.add_middleware(DBSessionMiddleware, engine=engine, **options)
    return app, engine


async def run_requests(driver: AsgiDriver, count: int, offset: int) -> float:
    """``count`` requests of the route; CPU µs per request."""
    started = process_time_ns()
    for i in range(offset, offset + count):
        status = await driver.request("GET", PATH.replace("{item_id}", str(item_id(i))))
        if status != 200:
            raise RuntimeError(f"{PATH}: status {status}")
    return (process_time_ns() - started) / count / 1000


async def measure_overhead(settings: OverheadSettings) -> OverheadResult | None:
    """Pairs of batches, sessionscope on and off; ``None`` if it cannot turn them off."""
    if not off_supported():
        return None
    built = [build_app(f"overhead_{observed}", observed=observed) for observed in (False, True)]
    drivers = [AsgiDriver(app) for app, _ in built]
    result = OverheadResult(differences=[], off_cpu=[], requests=settings.requests)
    try:
        for driver in drivers:
            await driver.start()
            await run_requests(driver, settings.warmup, 0)
        gc.collect()
        gc.freeze()
        offset = 0
        for pair in range(settings.pairs):
            cpu = [0.0, 0.0]
            for index in (0, 1) if pair % 2 == 0 else (1, 0):
                gc.collect()
                cpu[index] = await run_requests(drivers[index], settings.requests, offset)
                offset += settings.requests
            result.differences.append(cpu[1] - cpu[0])
            result.off_cpu.append(cpu[0])
    finally:
        gc.unfreeze()
        for driver in drivers:
            await driver.stop()
        for _, engine in built:
            engine.dispose()
    return result
