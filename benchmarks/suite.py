"""The whole benchmark run: in process, extra venv, scaling, memory, end to end, report."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import contenders as c
from .database import postgres_available, postgres_urls, prepare
from .e2e import E2ESettings, load_generator, run_e2e
from .inprocess import RunSettings, run_inprocess
from .instructions import (
    InstructionSettings,
    available,
    count_scaling,
    count_scenarios,
    measure_instructions,
)
from .machine import describe, postgres_version
from .overhead import OverheadSettings, measure_overhead
from .results import Results, load_measurements
from .rss import RssResult
from .scaling import ScalingSettings, measure_open_sessions, measure_routes
from .scenarios import SCENARIOS

REPO = Path(__file__).resolve().parent.parent
EXTRA_CONTENDERS = ("get_db", "ss_on", "ss_off", "ss_state", "fasa")


@dataclass(frozen=True)
class SuiteSettings:
    """Every knob of one run (see ``python -m benchmarks --help``)."""

    run: RunSettings
    scaling: ScalingSettings
    overhead: OverheadSettings
    instructions: InstructionSettings
    e2e: E2ESettings
    rss_total: int
    rss_checkpoint: int
    extra_python: str | None
    skip: frozenset[str]
    contenders: frozenset[str] | None = None
    """Measure only these contenders in process (``None``: every one)."""


COUNTED_CONTENDERS = ("get_db", "ss_on", "ss_off", "ss_state")
COUNTED_SCENARIOS = ("pg_aread", "pg_ainsert")
"""What is counted under callgrind besides the on/off route: the asyncpg scenarios, where the
contenders' wall times lie within a few % of each other (sessionscope through ``DBSession``,
metrics on and off, and through ``request.state.db``: what FastAPI's dependency costs)."""
COUNTED_NODB_CONTENDERS = ("bare", "get_db", "ss_on", "ss_off")
"""Counted on the DB-less route too: there identical code times 15 % or more apart between
app copies, as much as the margin of its target."""


SCALING_CONTENDERS = ("get_db", "ss_on")
"""Measured at each scaling level: sessionscope's change beside the hand-written pattern's."""


def _extra_run(python: str, settings: RunSettings, work: Path) -> Path:
    """Run the in-process comparison in the extra venv; the JSON it wrote."""
    out = work / "extra.json"
    scenarios = [s.key for s in SCENARIOS if s.mode == "async" or not s.uses_db]
    command = [
        python, "-m", "benchmarks", "inprocess",
        "--contenders", ",".join(EXTRA_CONTENDERS),
        "--scenarios", ",".join(scenarios),
        "--rounds", str(settings.rounds), "--requests", str(settings.requests),
        "--nodb-requests", str(settings.nodb_requests), "--warmup", str(settings.warmup),
        "--instances", str(settings.instances), "--json", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)
    return out


def _rss_run(total: int, checkpoint: int, work: Path) -> RssResult:
    import json

    out = work / "rss.json"
    command = [
        sys.executable, "-m", "benchmarks", "rss",
        "--total", str(total), "--checkpoint", str(checkpoint), "--json", str(out),
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)
    return RssResult(**json.loads(out.read_text()))


def _fastest_peer(results: Results) -> str | None:
    peers = [
        (m.median, m.contender)
        for m in results.inprocess
        if m.scenario == "read" and m.contender in c.PEERS and m.samples
    ]
    return min(peers)[1] if peers else None


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_suite(settings: SuiteSettings) -> Results:
    """Measure everything that is not skipped."""
    machine = describe()
    load_before = os.getloadavg()
    results = Results(
        machine=machine,
        settings={
            **asdict(settings.run),
            "e2e_duration": settings.e2e.duration,
            "e2e_connections": settings.e2e.connections,
            "e2e_rounds": settings.e2e.rounds,
        },
        off_supported=c.off_supported(),
    )
    pg = postgres_urls()
    has_pg = postgres_available(pg)
    results.postgres_version = postgres_version(pg.sync) if has_pg else None
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        if "inprocess" not in settings.skip:
            _log("in process: every contender, every scenario")
            results.inprocess, results.skipped = asyncio.run(
                run_inprocess(
                    [
                        x
                        for x in c.ALL
                        if settings.contenders is None or x.key in settings.contenders
                    ],
                    SCENARIOS,
                    settings.run,
                    work,
                    use_postgres=has_pg,
                )
            )
        if "extra" not in settings.skip and settings.extra_python:
            _log(f"in process, extra venv ({settings.extra_python})")
            extra, _skipped, extra_machine = load_measurements(
                _extra_run(settings.extra_python, settings.run, work)
            )
            new = {m.contender for m in extra} - {m.contender for m in results.inprocess}
            results.extra, results.extra_machine = extra, extra_machine
            results.extra_contenders = sorted(new)
            for key in new:
                results.skipped.pop(key, None)
        if "overhead" not in settings.skip:
            _log("metrics and logging: on vs off, paired")
            results.overhead = asyncio.run(measure_overhead(settings.overhead))
        if "instructions" not in settings.skip:
            if available():
                _log("metrics and logging: on vs off, instructions under callgrind")
                results.instructions = measure_instructions(settings.instructions)
            else:
                results.notes.append(
                    "Instruction counts skipped: valgrind is not installed "
                    "(Debian: apt-get install valgrind)."
                )
        if "nodb-instructions" not in settings.skip and available():
            _log("DB-less route: instructions under callgrind")
            results.scenario_instructions += (
                count_scenarios(list(COUNTED_NODB_CONTENDERS), ["nodb"], settings.instructions)
                or []
            )
        if "pg-instructions" not in settings.skip and available() and has_pg:
            _log("asyncpg read and insert: instructions under callgrind")
            prepare(pg)
            results.scenario_instructions += (
                count_scenarios(
                    list(COUNTED_CONTENDERS), list(COUNTED_SCENARIOS), settings.instructions
                )
                or []
            )
        if "scaling" not in settings.skip:
            scaled = [c.BY_KEY[k] for k in SCALING_CONTENDERS]
            _log("scaling: routes")
            results.routes = asyncio.run(measure_routes(scaled, settings.scaling, work))
            _log("scaling: open sessions")
            results.open_sessions = asyncio.run(
                measure_open_sessions(scaled, settings.scaling, work)
            )
        if "scaling-instructions" not in settings.skip and available() and has_pg:
            _log("scaling: instructions under callgrind (asyncpg read)")
            prepare(pg)
            results.scaling_instructions = (
                count_scaling(
                    list(SCALING_CONTENDERS),
                    {
                        "routes": settings.scaling.routes,
                        "open": settings.scaling.open_sessions,
                    },
                    settings.instructions,
                )
                or []
            )
        if "rss" not in settings.skip:
            _log(f"memory: {settings.rss_total:,} requests")
            results.rss = _rss_run(settings.rss_total, settings.rss_checkpoint, work)
        if "e2e" not in settings.skip:
            if has_pg:
                results.e2e_peer = _fastest_peer(results)
                chosen = [k for k in ("get_db", "ss_on", results.e2e_peer) if k]
                _log(f"end to end with {load_generator()}: {', '.join(chosen)}")
                prepare(pg)
                results.e2e = run_e2e(chosen, pg, settings.e2e, work / "servers.log")
            else:
                results.notes.append("End to end skipped: PostgreSQL did not answer.")
    results.notes.extend(_notes(results))
    load_after = os.getloadavg()
    results.notes.append(
        "Load average (1/5/15 min) at the start: "
        + "/".join(f"{x:.2f}" for x in load_before)
        + ", at the end: "
        + "/".join(f"{x:.2f}" for x in load_after)
        + f" on {machine['nproc']} cores; anything else running on the machine adds noise."
    )
    return results


def _notes(results: Results) -> list[str]:
    packages = results.machine["packages"]
    notes = [
        "Logging for the “on” figures: structlog configured as in production, "
        "`structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))` "
        "(events below INFO are dropped; what passes is rendered to /dev/null). "
        "Each sessionscope-on app gets its own Prometheus registry when the middleware "
        "accepts `registry=`.",
        f"fastapi-sqla {packages.get('fastapi-sqla', '?')} requires FastAPI < 0.142, so the "
        f"benchmark venv runs FastAPI {packages.get('fastapi', '?')} (the project venv may have "
        "a newer one); every contender in the table runs on that same FastAPI, Starlette "
        f"{packages.get('starlette', '?')} and SQLAlchemy {packages.get('SQLAlchemy', '?')}.",
        "fastapi-async-sqlalchemy 0.8.1 requires Python ≥ 3.12. When `run.sh` finds such a "
        "Python (`BENCH_EXTRA_PYTHON`, else `python3.13`/`python3.12` on PATH) it is measured "
        f"in a venv of its own ({EXTRA_MARK_TEXT}); otherwise it is left out.",
        "FastAPI-SQLAlchemy (`commit_on_exit=True`) commits the 409's write: it does not "
        "decide by status. advanced-alchemy and FastAPI-SQLAlchemy commit after the response "
        "has been sent; fastapi-sqla, fastapi-async-sqlalchemy and sessionscope before it.",
        "End-to-end servers use a pool of 40 + 10 connections (more than the 40 threadpool "
        "threads) so that the hand-written pattern cannot deadlock on the pool.",
    ]
    if not results.off_supported:
        notes.append(
            "The installed DBSessionMiddleware has no `metrics=False` / "
            "`closed_log_level=None` yet: the “off” row runs the defaults too."
        )
    return notes


EXTRA_MARK_TEXT = "rows marked †, with their own `Depends(get_db)` baseline"
