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
work the middleware does per wall-clock second (the once-a-second metric flush and structlog
level check, the leak sweep): under valgrind a second lasts ~50 times fewer requests, which
would inflate its share fifty-fold. At full speed that work is spread over thousands of
requests a second.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


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


def available() -> bool:
    """Whether valgrind is installed."""
    return shutil.which("valgrind") is not None


def _count(observed: bool, seed: int, requests: int, settings: InstructionSettings) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
            sys.executable, "-m", "benchmarks.instructions",
            "on" if observed else "off", str(requests), str(settings.warmup),
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
    runs = [
        (observed, seed, requests)
        for seed in range(settings.seeds)
        for observed in (False, True)
        for requests in (settings.short, settings.long)
    ]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = dict(zip(runs, pool.map(lambda run: _count(*run, settings), runs), strict=True))
    span = settings.long - settings.short

    def per_request(observed: bool, seed: int) -> float:
        long, short = totals[observed, seed, settings.long], totals[observed, seed, settings.short]
        return (long - short) / span

    seeds = range(settings.seeds)
    return InstructionResult(
        off_counts=[per_request(False, seed) for seed in seeds],
        on_counts=[per_request(True, seed) for seed in seeds],
        requests=span,
    )


def _hold_still() -> None:
    """No work per wall-clock second during the count (see the module docstring)."""
    from sessionscope import leaks, metric_batch, reporting

    metric_batch.MetricBatch.__init__.__kwdefaults__["interval"] = float("inf")
    reporting.LEVEL_RECHECK = float("inf")  # type: ignore[misc]
    leaks.LeakRegistry._start = lambda self: None  # type: ignore[method-assign]


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


def main(argv: list[str]) -> None:
    """``python -m benchmarks.instructions on|off REQUESTS WARMUP``: what callgrind runs."""
    from .logging_setup import configure_production_logging

    mode, requests, warmup = argv
    configure_production_logging()
    _hold_still()
    asyncio.run(_serve(mode == "on", int(requests), int(warmup)))


if __name__ == "__main__":
    main(sys.argv[1:])
