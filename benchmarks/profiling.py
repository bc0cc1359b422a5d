"""Profile one contender in one scenario with pyinstrument (installed in the benchmark venv).

``python -m benchmarks.profiling ss_on read --requests 2000`` prints where the time goes,
for finding sessionscope's hot spots when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from .contenders import BY_KEY, Target
from .database import postgres_urls, prepare, sqlite_urls
from .driver import AsgiDriver
from .inprocess import run_batch
from .logging_setup import configure_production_logging
from .scenarios import BY_KEY as SCENARIOS


async def _profile(contender: str, scenario_key: str, requests: int, directory: Path) -> str:
    from pyinstrument import Profiler  # type: ignore[import-not-found, unused-ignore]

    scenario = SCENARIOS[scenario_key]
    urls = sqlite_urls(directory) if scenario.database == "sqlite" else postgres_urls()
    prepare(urls)
    chosen = BY_KEY[contender]
    built = await chosen.build(Target(mode=scenario.app_mode(chosen), urls=urls))
    driver = AsgiDriver(built.app)
    await driver.start()
    try:
        await run_batch(driver, scenario, max(requests // 10, 10))
        profiler = Profiler(interval=0.0002, async_mode="enabled")
        with profiler:
            await run_batch(driver, scenario, requests, collect=False)
    finally:
        await driver.stop()
        await built.close()
    return str(profiler.output_text(unicode=False, color=False, show_all=False))


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("contender", choices=sorted(BY_KEY))
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    configure_production_logging()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        print(asyncio.run(_profile(args.contender, args.scenario, args.requests, Path(tmp))))


if __name__ == "__main__":
    main()
