"""Resident memory of a sessionscope app after many requests (run in a fresh interpreter).

Of every 30 requests, one is the sync one-row read, one the insert and one the 409 after a
write (so every outcome is exercised: commit, rollback, read-only commit); the others open
their session without running a statement (``GET /hold`` with its gate open), which keeps a
200,000-request run affordable where a thread hop costs hundreds of µs. RSS is read after
``checkpoint`` and after ``total`` requests, each time after a full garbage collection.
"""

from __future__ import annotations

import gc
import resource
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter

from .contenders import BY_KEY, Target
from .database import prepare, sqlite_urls
from .driver import AsgiDriver
from .endpoints import HOLD_PATH, HoldGate
from .scenarios import BY_KEY as SCENARIOS

_EVERY = 30
_DB = {0: SCENARIOS["read"], 10: SCENARIOS["insert"], 20: SCENARIOS["rollback"]}


@dataclass(frozen=True)
class RssResult:
    """RSS (MiB) after ``checkpoint`` and after ``total`` requests."""

    contender: str
    checkpoint: int
    total: int
    rss_checkpoint_mib: float
    rss_total_mib: float
    seconds: float

    @property
    def growth(self) -> float:
        """Relative growth from the checkpoint to the end."""
        return self.rss_total_mib / self.rss_checkpoint_mib - 1


def rss_mib() -> float:
    """The current resident set size in MiB (``/proc``; peak RSS where there is none)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _send(driver: AsgiDriver, start: int, stop: int) -> None:
    for i in range(start, stop):
        scenario = _DB.get(i % _EVERY)
        if scenario is None:
            method, path, expected = "GET", HOLD_PATH, 200
        else:
            method, path, expected = scenario.method, scenario.path_for(i), scenario.status
        status = await driver.request(method, path)
        if status != expected:
            raise RuntimeError(f"{method} {path}: status {status}, expected {expected}")


async def measure_rss(
    sqlite_dir: Path, *, contender_key: str, checkpoint: int, total: int
) -> RssResult:
    """Serve ``total`` requests; RSS after ``checkpoint`` of them and after all."""

    urls = sqlite_urls(sqlite_dir)
    prepare(urls)
    gate = HoldGate()
    gate.release()
    built = await BY_KEY[contender_key].build(Target(mode="sync", urls=urls, hold_gate=gate))
    driver = AsgiDriver(built.app)
    await driver.start()
    started = perf_counter()
    try:
        await _send(driver, 0, checkpoint)
        gc.collect()
        at_checkpoint = rss_mib()
        await _send(driver, checkpoint, total)
        gc.collect()
        at_total = rss_mib()
    finally:
        await driver.stop()
        await built.close()
    return RssResult(
        contender_key, checkpoint, total, at_checkpoint, at_total, perf_counter() - started
    )
