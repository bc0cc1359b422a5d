"""What metrics and logging cost per database request, counted in instructions (callgrind).

The paired timing of :mod:`benchmarks.overhead` is as close as timing gets, but on a shared VM
its quartiles lie tens of µs apart. An instruction count does not move with the machine's load:
here the same hop-free route (:func:`benchmarks.overhead.build_app`) runs under valgrind's
callgrind, metrics and logging on and off, each for a short and a long batch in a process of its
own; the difference between the two batches' totals, divided by the difference in requests, is
what one request executes, with start-up and warm-up cancelled out. A hash seed's dict layouts
move that figure by about 1 %, so it is counted under several seeds and averaged.

Held still for the count: garbage collection (frozen, then disabled after the warm-up, so a
collection landing in one batch and not the other does not count as the request's), and the
work the middleware does per wall-clock second (the once-a-second structlog level check, the
leak sweep): under valgrind a second lasts ~50 times fewer requests, which
would inflate its share fifty-fold. At full speed that work is spread over thousands of
requests a second.

The same way, :func:`count_scenarios` counts one request of a scenario of the in-process table
under several contenders: the asyncpg read and insert, where every contender sends the same
statements and the ratios of wall times sit within a few % of 1.00, moving by more than that
between runs of a shared VM; and the DB-less route, where two copies of one app time 15 % or more
apart. The instruction count of the app's process does not move with the machine's load (it
leaves out PostgreSQL's work and the kernel's, and it moves by a percent or two with the batch
sizes and the warm-up, which are the same for every contender).

:func:`count_scaling` counts the scaling measurements the same way: the asyncpg read served by
1 vs 500 routes, and while 10 vs 1,000 other requests hold their session open. The timed
rounds of :mod:`benchmarks.scaling` spread sessionscope's own share of the change over tens of
percent, against a target of 5 %; the count tells whether its per-request work grows. The
asyncpg read has no worker thread, so every instruction counted is the request's own on the
event loop.

Runs only where ``valgrind`` is installed (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .driver import AsgiDriver
    from .scenarios import Scenario

REPO = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")
K = TypeVar("K")


@dataclass(frozen=True)
class InstructionSettings:
    """Requests in the short and the long batch, and the hash seeds to count under."""

    short: int = 100
    long: int = 600
    warmup: int = 300
    seeds: int = 3
    """``PYTHONHASHSEED`` 0, 1, ...: one seed's dict layouts move a request's count by ~1 %
    (±12,000 instructions here), as much as the difference in question, so each seed counts
    on and off and the mean is taken."""
    scenario_seeds: int = 1
    """Seeds for :func:`count_scenarios` (each run of an asyncpg scenario costs ~1 minute)."""


@dataclass(frozen=True)
class InstructionResult:
    """Instructions per request of the hop-free database route, metrics and logging off/on,
    one figure per hash seed."""

    off_counts: list[float]
    on_counts: list[float]
    requests: int
    """The difference in requests between the long and the short batch."""

    @property
    def off(self) -> float:
        """Mean instructions per request, off."""
        return statistics.fmean(self.off_counts)

    @property
    def on(self) -> float:
        """Mean instructions per request, on."""
        return statistics.fmean(self.on_counts)

    @property
    def difference(self) -> float:
        """On minus off, instructions per request (means over the seeds)."""
        return self.on - self.off

    @property
    def differences(self) -> list[float]:
        """On minus off under each seed."""
        return [on - off for on, off in zip(self.on_counts, self.off_counts, strict=True)]

    def estimate_us(self, off_cpu_us: float) -> float:
        """The difference as µs, at the request's own rate of instructions per µs (its CPU
        time with them off, ``off_cpu_us``, over its instruction count)."""
        return self.difference / self.off * off_cpu_us


@dataclass(frozen=True)
class ScenarioInstructions:
    """Instructions per request of one in-process scenario under each contender, one figure
    per hash seed."""

    scenario: str
    counts: dict[str, list[float]]
    """Contender key -> instructions per request under each seed."""
    requests: int

    def mean(self, contender: str) -> float | None:
        """Mean over the seeds, if ``contender`` was counted."""
        found = self.counts.get(contender)
        return statistics.fmean(found) if found else None

    def ratio(self, contender: str, base: str) -> float | None:
        """``contender``'s mean over ``base``'s."""
        mine, theirs = self.mean(contender), self.mean(base)
        return None if mine is None or theirs is None else mine / theirs


def available() -> bool:
    """Whether valgrind is installed."""
    return shutil.which("valgrind") is not None


def _callgrind(arguments: list[str], seed: int) -> int:
    """The instructions ``python -m benchmarks.instructions ARGUMENTS`` executes."""
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
            sys.executable, "-m", "benchmarks.instructions", *arguments,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=1800
        )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def measure_instructions(settings: InstructionSettings) -> InstructionResult | None:
    """Instructions per request, on and off, under each seed; ``None`` without valgrind.

    The runs are single-threaded processes: as many run at once as there are cores.
    """
    if not available():
        return None

    def arguments(observed: bool, requests: int) -> list[str]:
        return ["on" if observed else "off", str(requests), str(settings.warmup)]

    counts = _per_request([False, True], settings.seeds, settings, arguments)
    return InstructionResult(
        off_counts=counts[False], on_counts=counts[True], requests=settings.long - settings.short
    )


def count_scenarios(
    contenders: list[str], scenarios: list[str], settings: InstructionSettings
) -> list[ScenarioInstructions] | None:
    """Instructions per request of each scenario under each contender; ``None`` without
    valgrind. The scenarios' tables must be prepared (the runs only read and insert rows)."""
    if not available():
        return None

    def arguments(run: tuple[str, str], requests: int) -> list[str]:
        scenario, contender = run
        return ["scenario", contender, scenario, str(requests), str(settings.warmup)]

    pairs = [(scenario, contender) for scenario in scenarios for contender in contenders]
    counts = _per_request(pairs, settings.scenario_seeds, settings, arguments)
    return [
        ScenarioInstructions(
            scenario=scenario,
            counts={k: counts[scenario, k] for k in contenders},
            requests=settings.long - settings.short,
        )
        for scenario in scenarios
    ]


def count_scaling(
    contenders: list[str], levels: dict[str, tuple[int, int]], settings: InstructionSettings
) -> list[ScenarioInstructions] | None:
    """Instructions per request of the asyncpg read at each scaling level, under each
    contender; ``None`` without valgrind. ``levels`` maps ``"routes"`` and ``"open"`` to their
    low and high levels; each result's ``scenario`` is ``"<kind>_<level>"`` (as in
    :mod:`benchmarks.scaling`). The read's table must be prepared."""
    if not available():
        return None
    runs = [(kind, level) for kind, pair in levels.items() for level in pair]

    def arguments(run: tuple[str, int, str], requests: int) -> list[str]:
        kind, level, contender = run
        return ["scaling", contender, kind, str(level), str(requests), str(settings.warmup)]

    keys = [(kind, level, contender) for kind, level in runs for contender in contenders]
    counts = _per_request(keys, settings.scenario_seeds, settings, arguments)
    return [
        ScenarioInstructions(
            scenario=f"{kind}_{level}",
            counts={k: counts[kind, level, k] for k in contenders},
            requests=settings.long - settings.short,
        )
        for kind, level in runs
    ]


def _per_request(
    keys: list[K],
    seeds: int,
    settings: InstructionSettings,
    arguments: Callable[[K, int], list[str]],
) -> dict[K, list[float]]:
    """For each key, under each seed: the instructions per request, from a short and a long
    batch counted in separate processes (``arguments(key, requests)``), as many at once as
    there are cores."""
    runs = [
        (key, seed, requests)
        for key in keys
        for seed in range(seeds)
        for requests in (settings.short, settings.long)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        found = pool.map(lambda run: _callgrind(arguments(run[0], run[2]), run[1]), runs)
        totals = dict(zip(runs, found, strict=True))
    span = settings.long - settings.short
    return {
        key: [
            (totals[key, seed, settings.long] - totals[key, seed, settings.short]) / span
            for seed in range(seeds)
        ]
        for key in keys
    }


def _hold_still() -> None:
    """No work per wall-clock second during the count (see the module docstring)."""
    import importlib

    def module(name: str) -> Any:
        # Internal modules are _-prefixed since the public-APIs round; earlier releases are
        # counted too (the before/after comparison), with their once-a-second metric flush.
        try:
            return importlib.import_module(f"sessionscope._{name}")
        except ImportError:
            return importlib.import_module(f"sessionscope.{name}")

    module("reporting").LEVEL_RECHECK = float("inf")
    module("leaks").LeakRegistry._start = lambda self: None
    try:
        batch = importlib.import_module("sessionscope.metric_batch")
    except ImportError:
        pass  # no batching: metrics are updated as each request ends
    else:
        batch.MetricBatch.__init__.__kwdefaults__["interval"] = float("inf")


async def _serve(observed: bool, requests: int, warmup: int) -> None:
    from .driver import AsgiDriver
    from .overhead import build_app, run_requests

    app, engine = build_app("instructions", observed=observed)
    driver = AsgiDriver(app)
    await driver.start()
    try:
        await run_requests(driver, warmup, 0)
        gc.collect()
        gc.freeze()
        gc.disable()
        await run_requests(driver, requests, warmup)
    finally:
        await driver.stop()
        engine.dispose()


async def _serve_scenario(
    contender_key: str, scenario_key: str, requests: int, warmup: int
) -> None:
    from .contenders import BY_KEY, Target
    from .database import postgres_urls, sqlite_urls
    from .driver import AsgiDriver
    from .scenarios import BY_KEY as SCENARIOS

    scenario = SCENARIOS[scenario_key]
    if scenario.database != "postgres" and scenario.uses_db:
        raise SystemExit(f"{scenario_key}: only the PostgreSQL and DB-less scenarios are counted")
    contender = BY_KEY[contender_key]
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        # The DB-less route's engines are made, never connected.
        urls = postgres_urls() if scenario.database == "postgres" else sqlite_urls(Path(tmp))
        built = await contender.build(Target(mode=scenario.app_mode(contender), urls=urls))
        driver = AsgiDriver(built.app)
        await driver.start()
        try:
            await _counted_batch(driver, scenario, warmup, requests)
        finally:
            await driver.stop()
            await built.close()


SCALING_SCENARIO = "pg_aread"
"""What :func:`count_scaling` counts: the asyncpg read (no worker thread)."""


async def _serve_scaling(
    contender_key: str, kind: str, level: int, requests: int, warmup: int
) -> None:
    from .contenders import BY_KEY, Target
    from .database import postgres_urls
    from .driver import AsgiDriver
    from .endpoints import HoldGate
    from .scaling import sessions_held, spread
    from .scenarios import BY_KEY as SCENARIOS

    if kind not in ("routes", "open"):
        raise SystemExit(f"{kind}: the scaling kinds are 'routes' and 'open'")
    copies = level if kind == "routes" else 1
    gate = HoldGate() if kind == "open" else None
    scenario = spread(copies, SCENARIOS[SCALING_SCENARIO])
    target = Target(mode="async", urls=postgres_urls(), route_copies=copies, hold_gate=gate)
    built = await BY_KEY[contender_key].build(target)
    driver = AsgiDriver(built.app)
    await driver.start()
    try:
        held: AbstractAsyncContextManager[None] = (
            nullcontext() if gate is None else sessions_held(driver, gate, level)
        )
        async with held:
            # Every route is seen in the warm-up: first-sight work is not a per-request cost.
            await _counted_batch(driver, scenario, max(warmup, 2 * copies), requests)
    finally:
        await driver.stop()
        await built.close()


async def _counted_batch(
    driver: AsgiDriver, scenario: Scenario, warmup: int, requests: int
) -> None:
    """``warmup`` requests, then ``requests`` more with garbage collection held still."""
    from .inprocess import run_batch

    await run_batch(driver, scenario, warmup, collect=False)
    gc.collect()
    gc.freeze()
    gc.disable()
    await run_batch(driver, scenario, requests, warmup, collect=False)


def main(argv: list[str]) -> None:
    """What callgrind runs: ``python -m benchmarks.instructions on|off REQUESTS WARMUP`` (the
    hop-free route), ``... scenario CONTENDER SCENARIO REQUESTS WARMUP`` or ``... scaling
    CONTENDER routes|open LEVEL REQUESTS WARMUP``."""
    from .logging_setup import configure_production_logging

    configure_production_logging()
    _hold_still()
    if argv[0] == "scenario":
        contender, scenario, requests, warmup = argv[1:]
        asyncio.run(_serve_scenario(contender, scenario, int(requests), int(warmup)))
        return
    if argv[0] == "scaling":
        contender, kind, level, requests, warmup = argv[1:]
        asyncio.run(_serve_scaling(contender, kind, int(level), int(requests), int(warmup)))
        return
    mode, requests, warmup = argv
    asyncio.run(_serve(mode == "on", int(requests), int(warmup)))


if __name__ == "__main__":
    main(sys.argv[1:])
