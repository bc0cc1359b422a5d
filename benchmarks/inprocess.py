"""The in-process comparison: every contender, every scenario, interleaved rounds.

Each round runs every (scenario, contender) batch once, the contenders in a rotated order, so
slow drift (CPU frequency, caches, the SQLite file growing) affects all of them alike. The
figure per batch is µs/request; the reported figure is the median over the rounds.

Each contender's app is built several times (``instances``) and the rounds rotate over the
copies. One built app runs the same instructions faster or slower than an identical copy of
it, by where its objects landed in memory: two copies of the bare FastAPI app measured 5 %
apart, and a ``Depends(get_db)`` app serving the DB-less route with exactly bare FastAPI's
instruction count (callgrind: 281,817 against 281,820 per request) measured 0.93 to 1.13
times bare. With one copy per contender that luck is fixed for the whole run and lands in
every ratio; over several copies the median evens it out.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns, process_time_ns

from .contenders import Built, Contender, Mode, Target, unavailable
from .database import Urls, postgres_available, postgres_urls, prepare, sqlite_urls
from .driver import AsgiDriver
from .scenarios import Database, Scenario


@dataclass(frozen=True)
class RunSettings:
    """How much to measure."""

    rounds: int = 7
    requests: int = 400
    """Requests per batch for scenarios that use the database."""
    nodb_requests: int = 2000
    """Requests per batch for the DB-less route (it is ~10x cheaper)."""
    warmup: int = 200
    instances: int = 3
    """Copies of each contender's app; round ``r`` measures copy ``r % instances``."""
    collect: bool = True
    """Collect garbage before every batch (off only to make smoke runs fast)."""


@dataclass
class Measurement:
    """One contender in one scenario: µs/request of each round."""

    scenario: str
    contender: str
    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """CPU µs/request of each round (process time: the event loop and worker threads)."""

    @property
    def median(self) -> float:
        """Median µs/request over the rounds."""
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float | None:
        """Median CPU µs/request over the rounds, if recorded."""
        return statistics.median(self.cpu) if self.cpu else None


class AppPool:
    """The built and started apps, one per (contender, mode, database)."""

    def __init__(self, sqlite_dir: Path, postgres: Urls | None) -> None:
        self.urls: dict[Database, Urls] = {"sqlite": sqlite_urls(sqlite_dir)}
        if postgres is not None:
            self.urls["postgres"] = postgres
        self._built: list[Built] = []
        self._drivers: dict[tuple[str, Mode, Database, int], AsgiDriver] = {}

    async def driver(
        self, contender: Contender, mode: Mode, database: Database, instance: int = 0
    ) -> AsgiDriver:
        """The started driver of copy ``instance`` of ``contender``'s app for ``mode`` on
        ``database``."""
        key = (contender.key, mode, database, instance)
        found = self._drivers.get(key)
        if found is None:
            built = await contender.build(Target(mode=mode, urls=self.urls[database]))
            self._built.append(built)
            found = self._drivers[key] = AsgiDriver(built.app)
            await found.start()
        return found

    async def close(self) -> None:
        """Stop every app and dispose of its engines."""
        for driver in self._drivers.values():
            await driver.stop()
        for built in self._built:
            await built.close()


async def run_batch(
    driver: AsgiDriver,
    scenario: Scenario,
    count: int,
    offset: int = 0,
    *,
    collect: bool = True,
    cpu_out: list[float] | None = None,
) -> float:
    """Send ``count`` requests of ``scenario`` one after another; wall µs/request.

    With ``cpu_out``, the CPU µs/request (process time, all threads) is appended to it.
    """
    if collect:
        gc.collect()
    method, path_for, expected = scenario.method, scenario.path_for, scenario.status
    wrong = 0
    cpu_started = process_time_ns()
    started = perf_counter_ns()
    for i in range(offset, offset + count):
        if await driver.request(method, path_for(i)) != expected:
            wrong += 1
    elapsed = perf_counter_ns() - started
    if cpu_out is not None:
        cpu_out.append((process_time_ns() - cpu_started) / count / 1000)
    if wrong:
        status = await driver.request(method, path_for(offset))
        raise RuntimeError(
            f"{scenario.key}: {wrong}/{count} responses were not {expected} (e.g. {status})"
        )
    return elapsed / count / 1000


def plan(
    contenders: Iterable[Contender], scenarios: Iterable[Scenario], *, postgres: bool
) -> tuple[list[tuple[Scenario, list[Contender]]], dict[str, str]]:
    """Which contenders run in which scenario, and why the others do not."""
    skipped: dict[str, str] = {}
    runnable = []
    for contender in contenders:
        reason = unavailable(contender)
        if reason is None:
            runnable.append(contender)
        else:
            skipped[contender.key] = reason
    pairs = []
    for scenario in scenarios:
        if scenario.database == "postgres" and not postgres:
            skipped[scenario.key] = "PostgreSQL is not available"
            continue
        pairs.append((scenario, [c for c in runnable if scenario.runs(c)]))
    return pairs, skipped


async def run_inprocess(
    contenders: Sequence[Contender],
    scenarios: Sequence[Scenario],
    settings: RunSettings,
    sqlite_dir: Path,
    *,
    use_postgres: bool = True,
) -> tuple[list[Measurement], dict[str, str]]:
    """Measure every runnable (scenario, contender); the measurements and what was skipped."""
    pg = postgres_urls() if use_postgres else None
    if pg is not None and any(s.database == "postgres" for s in scenarios):
        if postgres_available(pg):
            prepare(pg)
        else:
            pg = None
    prepare(sqlite_urls(sqlite_dir))
    pairs, skipped = plan(contenders, scenarios, postgres=pg is not None)
    apps = AppPool(sqlite_dir, pg)
    results: dict[tuple[str, str], Measurement] = {}
    try:
        for scenario, runners in pairs:
            for contender in runners:
                for instance in range(settings.instances):
                    driver = await apps.driver(
                        contender, scenario.app_mode(contender), scenario.database, instance
                    )
                    await run_batch(driver, scenario, settings.warmup, collect=False)
                results[scenario.key, contender.key] = Measurement(scenario.key, contender.key)
        # What setup and warm-up allocated is never garbage: keep it out of every collection,
        # so the collection before each batch is cheap and the same for every contender.
        gc.collect()
        gc.freeze()
        for round_no in range(settings.rounds):
            for scenario, runners in pairs:
                count = settings.requests if scenario.uses_db else settings.nodb_requests
                shift = round_no % len(runners) if runners else 0
                order = runners[shift:] + runners[:shift]
                if round_no % 2:
                    order.reverse()
                for contender in order:
                    driver = await apps.driver(
                        contender,
                        scenario.app_mode(contender),
                        scenario.database,
                        round_no % settings.instances,
                    )
                    measurement = results[scenario.key, contender.key]
                    sample = await run_batch(
                        driver,
                        scenario,
                        count,
                        round_no * count,
                        collect=settings.collect,
                        cpu_out=measurement.cpu,
                    )
                    measurement.samples.append(sample)
    finally:
        gc.unfreeze()
        await apps.close()
    return list(results.values()), skipped
