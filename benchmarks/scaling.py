"""Does per-request cost grow with the number of routes or of sessions open at once?

* routes: the sync one-row read served by 1 route vs by 500 copies of it, the requests
  spread over all of them (so per-route state, e.g. metric children, is exercised);
* open sessions: the sync one-row read while 10 vs 1,000 other requests hold their session
  open (``GET /hold`` waiting at a gate). The engines get ``max_overflow`` large enough for
  every held session, since sessionscope admits sync sessions only up to the pool's capacity.

Both compare sessionscope with the ``Depends(get_db)`` app built the same way, so the cost
FastAPI itself adds (route matching is linear in the number of routes) can be told apart.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from .contenders import Built, Contender, Target
from .database import item_id, prepare, sqlite_urls
from .driver import AsgiDriver
from .endpoints import HOLD_PATH, HoldGate
from .inprocess import Measurement, run_batch
from .scenarios import BY_KEY as SCENARIOS
from .scenarios import Scenario

READ = SCENARIOS["read"]
HOLD_TIMEOUT = 60.0


@dataclass(frozen=True)
class ScalingSettings:
    """How much to measure."""

    rounds: int = 6
    requests: int = 300
    routes: tuple[int, int] = (1, 500)
    open_sessions: tuple[int, int] = (10, 1000)
    instances: int = 3
    """Copies of each routes app; round ``r`` measures copy ``r % instances`` (see
    :mod:`benchmarks.inprocess`: one copy's memory layout moves its timings by several %)."""
    collect: bool = True
    """Collect garbage before every batch (off only to make smoke runs fast)."""


def spread(copies: int, scenario: Scenario = READ) -> Scenario:
    """A read scenario with its requests spread over ``copies`` route prefixes."""

    class Spread(Scenario):
        def path_for(self, i: int) -> str:
            prefix = "" if copies == 1 or i % copies == 0 else f"/r{i % copies}"
            return f"{prefix}/items/{item_id(i)}"

    return Spread(**{f: getattr(scenario, f) for f in scenario.__dataclass_fields__})


async def _start(contender: Contender, target: Target) -> tuple[Built, AsgiDriver]:
    built = await contender.build(target)
    driver = AsgiDriver(built.app)
    await driver.start()
    return built, driver


async def measure_routes(
    contenders: Sequence[Contender], settings: ScalingSettings, sqlite_dir: Path
) -> list[Measurement]:
    """µs/request of the read with few vs many routes, for each contender."""
    urls = sqlite_urls(sqlite_dir)
    prepare(urls)
    started = []
    results = []
    for contender in contenders:
        for copies in settings.routes:
            scenario = spread(copies)
            measurement = Measurement(f"routes_{copies}", contender.key)
            results.append(measurement)
            for instance in range(settings.instances):
                built, driver = await _start(
                    contender, Target(mode="sync", urls=urls, route_copies=copies)
                )
                # Every route is seen before measuring: first-sight work (per-route metric
                # children) is a one-off, not a per-request cost.
                warmup = max(settings.requests, 2 * copies)
                await run_batch(driver, scenario, warmup, collect=False)
                started.append((instance, built, driver, scenario, measurement))
    if settings.collect:
        gc.collect()
    gc.freeze()  # setup is never garbage: keeps the per-batch collection cheap
    try:
        for round_no in range(settings.rounds):
            instance = round_no % settings.instances
            this_round = [entry for entry in started if entry[0] == instance]
            order = this_round if round_no % 2 == 0 else this_round[::-1]
            for _instance, _built, driver, scenario, measurement in order:
                offset = round_no * settings.requests
                measurement.samples.append(
                    await run_batch(
                        driver, scenario, settings.requests, offset, collect=settings.collect
                    )
                )
    finally:
        gc.unfreeze()
        for _instance, built, driver, _scenario, _m in started:
            await driver.stop()
            await built.close()
    return results


@asynccontextmanager
async def sessions_held(driver: AsgiDriver, gate: HoldGate, held: int) -> AsyncIterator[None]:
    """Keep ``held`` requests waiting at ``gate`` with their session open for the block."""
    holders = [asyncio.create_task(driver.request("GET", HOLD_PATH)) for _ in range(held)]
    try:
        await asyncio.wait_for(gate.until_waiting(held), timeout=HOLD_TIMEOUT)
    except TimeoutError:
        gate.release()
        await asyncio.gather(*holders, return_exceptions=True)
        message = f"only {gate.waiting} of {held} /hold requests got their session"
        raise RuntimeError(message) from None
    try:
        yield
    finally:
        gate.release()
        statuses = await asyncio.gather(*holders)
        if any(s != 200 for s in statuses):
            raise RuntimeError(f"/hold answered {sorted(set(statuses))}")


async def _measure_while_held(
    driver: AsgiDriver, gate: HoldGate, held: int, count: int, offset: int, collect: bool
) -> float:
    async with sessions_held(driver, gate, held):
        return await run_batch(driver, READ, count, offset, collect=collect)


async def measure_open_sessions(
    contenders: Sequence[Contender], settings: ScalingSettings, sqlite_dir: Path
) -> list[Measurement]:
    """µs/request of the read while few vs many sessions are open, for each contender."""
    urls = sqlite_urls(sqlite_dir)
    prepare(urls)
    results: list[Measurement] = []
    for contender in contenders:
        for held in settings.open_sessions:
            results.append(Measurement(f"open_{held}", contender.key))
    for round_no in range(settings.rounds):
        for index, contender in enumerate(contenders):
            levels = settings.open_sessions
            if (round_no + index) % 2:
                levels = levels[::-1]
            for held in levels:
                gate = HoldGate()
                # Room in the pool for every held session: sessionscope admits sync request
                # sessions only up to the pool's capacity (pool_size + max_overflow).
                pool = {"max_overflow": max(settings.open_sessions) + 50}
                target = Target(mode="sync", urls=urls, hold_gate=gate, engine_kwargs=pool)
                built, driver = await _start(contender, target)
                try:
                    await run_batch(driver, READ, settings.requests // 4, collect=False)
                    if settings.collect:
                        gc.collect()
                    gc.freeze()
                    sample = await _measure_while_held(
                        driver,
                        gate,
                        held,
                        settings.requests,
                        round_no * settings.requests,
                        settings.collect,
                    )
                finally:
                    gc.unfreeze()
                    await driver.stop()
                    await built.close()
                next(
                    m
                    for m in results
                    if m.scenario == f"open_{held}" and m.contender == contender.key
                ).samples.append(sample)
    return results
