"""Keeps the benchmark harness working: every scenario runs a few times, nothing is timed.

Only the contenders importable in the project venv take part (bare FastAPI, the hand-written
``Depends(get_db)`` and sessionscope with metrics and logging on and off); the peers live in
the benchmark venv that ``make bench`` creates.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import before_after, instructions
from benchmarks import contenders as c
from benchmarks.contenders.base import built
from benchmarks.database import POSTGRES_URL_ENV, postgres_urls, prepare, remove_sqlite_pragmas
from benchmarks.e2e import E2EMeasurement, LoadResult, parse_wrk
from benchmarks.inprocess import Measurement, RunSettings, run_inprocess
from benchmarks.instructions import InstructionResult, ScenarioInstructions
from benchmarks.overhead import OverheadResult, OverheadSettings, measure_overhead
from benchmarks.report import (
    comparison_table,
    paired_e2e_ratios,
    render,
    scaling_shares,
    verdicts,
)
from benchmarks.results import Results
from benchmarks.rss import measure_rss
from benchmarks.scaling import ScalingSettings, measure_open_sessions, measure_routes
from benchmarks.scenarios import SCENARIOS
from benchmarks.suite import (
    COUNTED_CONTENDERS,
    COUNTED_NODB_CONTENDERS,
    COUNTED_SCENARIOS,
    SCALING_CONTENDERS,
)

from .support import postgres_url

REPO = Path(__file__).resolve().parent.parent

LOCAL = [
    c.BY_KEY[k] for k in ("bare", "get_db", "get_db_aa", "get_db_fn", "ss_on", "ss_off", "ss_state")
]
TINY = RunSettings(rounds=2, requests=3, nodb_requests=3, warmup=2, instances=1, collect=False)
WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8000/items/1
  2 threads and 64 connections
  Latency Distribution
     50%    2.50ms
     75%    3.10ms
     90%    4.00ms
     99%    1.20s
  1000 requests in 3.00s, 150.00KB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:    333.33
"""


def _results(**parts: Any) -> Results:
    """Results of a one-round run on a made-up machine, with the given measurements."""
    machine = {"nproc": 2, "cpu": "cpu", "os": "os", "python": "3", "packages": {}}
    return Results(machine=machine, settings={"rounds": 1}, **parts)


@pytest.fixture(autouse=True)
def _no_global_pragmas() -> Iterator[None]:
    """The harness sets WAL on every SQLite engine of the process: not for other tests."""
    yield
    remove_sqlite_pragmas()


def test_every_sqlite_scenario_runs_for_every_local_contender(tmp_path: Path) -> None:
    scenarios = [s for s in SCENARIOS if s.database == "sqlite"]
    measurements, skipped = asyncio.run(
        run_inprocess(LOCAL, scenarios, TINY, tmp_path, use_postgres=False)
    )
    measured = {(m.scenario, m.contender) for m in measurements}
    for scenario in scenarios:
        for contender in LOCAL:
            if scenario.runs(contender) and c.unavailable(contender) is None:
                assert (scenario.key, contender.key) in measured
    assert all(len(m.samples) == len(m.cpu) == TINY.rounds for m in measurements)
    assert set(skipped) <= {"get_db_fn"}


def test_the_rounds_rotate_over_copies_of_each_contenders_app(tmp_path: Path) -> None:
    served: list[int] = []
    built_copies: list[int] = []

    async def build(target: Any) -> c.Built:
        copy = len(built_copies)
        built_copies.append(copy)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return  # no lifespan support
            served.append(copy)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        return built(app)  # type: ignore[arg-type]

    counting = c.Contender(
        key="copies", label="copies", modes=frozenset({"sync"}), build=build, db_free=True
    )
    settings = RunSettings(
        rounds=4, requests=1, nodb_requests=5, warmup=2, instances=3, collect=False
    )
    nodb = [s for s in SCENARIOS if not s.uses_db]
    measurements, _ = asyncio.run(
        run_inprocess([counting], nodb, settings, tmp_path, use_postgres=False)
    )
    assert built_copies == [0, 1, 2]
    warmups, rounds = served[:6], served[6:]
    assert warmups == [0, 0, 1, 1, 2, 2]
    assert rounds == [0] * 5 + [1] * 5 + [2] * 5 + [0] * 5  # round r measures copy r % 3
    assert len(measurements[0].samples) == 4


def test_scaling_and_memory_run(tmp_path: Path) -> None:
    pair = [c.BY_KEY["get_db"], c.BY_KEY["ss_on"]]
    settings = ScalingSettings(
        rounds=1, requests=4, routes=(1, 3), open_sessions=(1, 5), instances=1, collect=False
    )
    routes = asyncio.run(measure_routes(pair, settings, tmp_path))
    held = asyncio.run(measure_open_sessions(pair, settings, tmp_path))
    assert {m.scenario for m in routes} == {"routes_1", "routes_3"}
    assert {m.scenario for m in held} == {"open_1", "open_5"}
    rss = asyncio.run(measure_rss(tmp_path, contender_key="ss_on", checkpoint=31, total=62))
    assert rss.rss_total_mib > 0


def test_the_paired_on_off_measurement_runs() -> None:
    settings = OverheadSettings(pairs=3, requests=4, warmup=2)
    result = asyncio.run(measure_overhead(settings))
    assert result is not None
    assert len(result.differences) == len(result.off_cpu) == 3
    assert result.off_median > 0


def test_report_renders_with_every_part() -> None:
    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed == LoadResult(rps=333.33, p50_ms=2.5, p99_ms=1200.0, errors=6)
    results = _results(
        inprocess=[
            Measurement("read", "get_db", [100.0]),
            Measurement("read", "ss_on", [80.0]),
            Measurement("nodb", "bare", [10.0]),
            Measurement("nodb", "ss_on", [12.0]),
            Measurement("nodb", "get_db", [11.5]),
        ],
        routes=[
            Measurement("routes_1", "ss_on", [80.0]),
            Measurement("routes_500", "ss_on", [82.0]),
        ],
        e2e=[E2EMeasurement("read", "ss_on", [parsed]), E2EMeasurement("read", "get_db", [parsed])],
        overhead=OverheadResult(differences=[4.0, 6.0, 5.0, 30.0], off_cpu=[200.0], requests=9),
        off_supported=True,
    )
    text = render(results)
    assert "median +5.5" in text
    assert "paired on a hop-free database route" in text
    assert "Depends(get_db)" in comparison_table(results)
    assert "## Targets" in text
    assert any(v.met for v in verdicts(results))
    (nodb,) = [v for v in verdicts(results) if v.target.startswith("DB-less")]
    assert nodb.met  # 1.20x; the noise check is shown, not judged
    assert "= 1.20x; noise check: Depends(get_db), the same code as bare" in nodb.figures
    assert "1.15x" in nodb.figures


def test_a_peer_of_the_extra_venv_is_compared_with_sessionscope_measured_in_that_venv() -> None:
    # Here sessionscope is at 0.90x of Depends(get_db) and the peer at 0.95x of the extra
    # venv's own; measured side by side in that venv, sessionscope was the slower one.
    results = _results(
        inprocess=[
            Measurement("pg_aread", "get_db", [100.0]),
            Measurement("pg_aread", "ss_on", [90.0]),
        ],
        extra=[
            Measurement("pg_aread", "get_db", [200.0]),
            Measurement("pg_aread", "ss_on", [196.0]),
            Measurement("pg_aread", "ss_state", [180.0]),
            Measurement("pg_aread", "fasa", [190.0]),
        ],
        extra_contenders=["fasa"],
    )
    (read,) = [v for v in verdicts(results) if v.target.startswith("asyncpg read")]
    # Judged on DBSession; the request.state.db figure (ahead of the peer) is only shown.
    assert read.met is False
    assert (
        "fastapi-async-sqlalchemy 0.95x (sessionscope there 0.98x†, via request.state.db 0.90x)"
        in read.figures
    )


def test_async_columns_are_judged_within_the_band_two_identical_get_db_contenders_span() -> None:
    # The two copies of Depends(get_db) land 6 % apart in one async column: sessionscope at
    # 1.05x is within that run's noise; at 1.07x it is not.
    def run(ours: float) -> Results:
        return _results(
            inprocess=[
                Measurement("aread", "get_db", [100.0]),
                Measurement("aread", "get_db_aa", [106.0]),
                Measurement("aread", "ss_on", [ours]),
                Measurement("pg_aread", "get_db", [100.0]),
                Measurement("pg_aread", "get_db_aa", [98.0]),
                Measurement("pg_aread", "ss_on", [99.0]),
            ]
        )

    (within,) = [v for v in verdicts(run(105.0)) if v.target.startswith("async read")]
    assert within.met is True
    assert within.target == (
        "async read: within the A/A noise band of Depends(get_db) and faster than every peer"
    )
    assert "A/A band ±0.06 (this column's A/A 1.06x), so ≤ 1.06x" in within.figures
    (outside,) = [v for v in verdicts(run(107.0)) if v.target.startswith("async read")]
    assert outside.met is False


def test_a_saved_run_is_compared_with_this_one_figure_by_figure(tmp_path: Path) -> None:
    before_run = _results(
        inprocess=[
            Measurement("read", "get_db", [100.0]),
            Measurement("read", "ss_on", [80.0]),
            Measurement("nodb", "bare", [10.0]),
            Measurement("nodb", "ss_on", [11.0]),
        ],
        scenario_instructions=[
            ScenarioInstructions("pg_aread", {"ss_on": [1_000_000.0], "get_db": [990_000.0]}, 9)
        ],
    )
    saved = tmp_path / "before.json"
    before_after.save(before_run, "before (old code)", saved)
    after_run = _results(
        inprocess=[
            Measurement("read", "get_db", [100.0]),
            Measurement("read", "ss_on", [92.0]),
            Measurement("nodb", "bare", [10.0]),
            Measurement("nodb", "ss_on", [12.0]),
        ],
        scenario_instructions=[
            ScenarioInstructions("pg_aread", {"ss_on": [1_010_000.0], "get_db": [990_000.0]}, 9)
        ],
    )
    table = before_after.section(before_after.load(saved), after_run, "after")
    assert "| figure | target | before (old code) | after | after: verdict or change |" in table
    assert "| DB-less route / bare FastAPI | ≤ 1.25x | 1.10x | 1.20x | met |" in table
    assert "| sync read / Depends(get_db) | ≤ 0.90x | 0.80x | 0.92x | **missed** by 0.02x |" in (
        table
    )
    assert (
        "| asyncpg read: instructions/request, sessionscope (callgrind) |  | 1,000,000 | "
        "1,010,000 | +10,000 (+1.0%) |"
    ) in table


def test_end_to_end_target_compares_each_round_with_the_baseline_of_the_same_round() -> None:
    def runs(*figures: tuple[float, float]) -> list[LoadResult]:
        return [LoadResult(rps=rps, p50_ms=p99 / 2, p99_ms=p99, errors=0) for rps, p99 in figures]

    # The machine slows down in round 2: taken separately, sessionscope's median p99 (310 ms)
    # is worse than get_db's (300 ms), yet it is ahead in two of the three rounds.
    ours = E2EMeasurement("read", "ss_on", runs((210, 190), (105, 390), (150, 310)))
    base = E2EMeasurement("read", "get_db", runs((200, 200), (100, 400), (150, 300)))
    rps, p99 = paired_e2e_ratios(ours, base)
    assert rps == pytest.approx([1.05, 1.05, 1.0])
    assert p99 == pytest.approx([0.95, 0.975, 310 / 300])
    results = _results(
        e2e=[ours, base],
    )
    (read,) = [v for v in verdicts(results) if v.target.startswith("end to end (read)")]
    assert read.met is True
    assert "p99 0.97x (0.95-1.03), p99 no worse in 2 of 3 rounds" in read.figures


def test_scaling_share_subtracts_the_baselines_change_in_the_same_round() -> None:
    # Round 2 runs 20 % slower for everybody; in both rounds sessionscope's change exceeds
    # Depends(get_db)'s by 2 % of its own figure, and only that is its own share.
    shares = scaling_shares([100, 120], [104, 124.8], [200, 240], [202, 242.4])
    assert shares == pytest.approx([0.02, 0.02])


def _count_child(*arguments: str, env: dict[str, str] | None = None) -> None:
    """Run what callgrind runs (``python -m benchmarks.instructions ARGUMENTS``), without it."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_instruction_count_child_serves_the_route_with_metrics_on_and_off() -> None:
    for mode in ("on", "off"):
        _count_child(mode, "5", "5")


def test_instruction_count_child_serves_the_db_less_route_for_each_counted_contender() -> None:
    for contender in COUNTED_NODB_CONTENDERS:
        _count_child("scenario", contender, "nodb", "3", "2")


@pytest.mark.postgres
def test_instruction_count_child_serves_the_asyncpg_scenarios_for_each_counted_contender() -> None:
    url = postgres_url()
    prepare(postgres_urls(url))
    for contender in COUNTED_CONTENDERS:
        for scenario in COUNTED_SCENARIOS:
            _count_child(
                "scenario", contender, scenario, "3", "2", env={**os.environ, POSTGRES_URL_ENV: url}
            )


@pytest.mark.postgres
def test_instruction_count_child_serves_the_scaling_levels_for_each_scaled_contender() -> None:
    url = postgres_url()
    prepare(postgres_urls(url))
    for contender in SCALING_CONTENDERS:
        for kind, level in (("routes", "3"), ("open", "4")):
            _count_child(
                "scaling",
                contender,
                kind,
                level,
                "3",
                "2",
                env={**os.environ, POSTGRES_URL_ENV: url},
            )


def test_scaling_verdicts_take_the_instruction_count_over_the_timed_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake callgrind: start-up 10**9; a read costs get_db 1,000 instructions and ss_on 900,
    # 500 routes add 100 to both (FastAPI's route matching) and ss_on 20 more of its own (+2 %
    # of 900); 1,000 open sessions add 60 to ss_on alone (+6.7 %).
    per_request = {
        ("get_db", "routes", 1): 1_000, ("get_db", "routes", 500): 1_100,
        ("ss_on", "routes", 1): 900, ("ss_on", "routes", 500): 1_020,
        ("get_db", "open", 10): 1_000, ("get_db", "open", 1000): 1_000,
        ("ss_on", "open", 10): 900, ("ss_on", "open", 1000): 960,
    }  # fmt: skip

    def fake_callgrind(arguments: list[str], seed: int) -> int:
        what, contender, kind, level, requests, _warmup = arguments
        assert what == "scaling"
        return 10**9 + int(requests) * per_request[contender, kind, int(level)]

    monkeypatch.setattr(instructions, "available", lambda: True)
    monkeypatch.setattr(instructions, "_callgrind", fake_callgrind)
    counted = instructions.count_scaling(
        ["get_db", "ss_on"],
        {"routes": (1, 500), "open": (10, 1000)},
        instructions.InstructionSettings(short=10, long=70),
    )
    assert counted is not None
    assert [c.scenario for c in counted] == ["routes_1", "routes_500", "open_10", "open_1000"]
    assert counted[1].counts == {"get_db": [1_100], "ss_on": [1_020]}

    # The timed rounds say the opposite of the count in both measurements.
    results = _results(
        routes=[
            Measurement("routes_1", "ss_on", [800.0]),
            Measurement("routes_500", "ss_on", [1_000.0]),
            Measurement("routes_1", "get_db", [1_000.0]),
            Measurement("routes_500", "get_db", [1_050.0]),
        ],
        open_sessions=[
            Measurement("open_10", "ss_on", [800.0]),
            Measurement("open_1000", "ss_on", [790.0]),
            Measurement("open_10", "get_db", [1_000.0]),
            Measurement("open_1000", "get_db", [1_000.0]),
        ],
        scaling_instructions=counted,
    )
    found = verdicts(results)
    (routes,) = [v for v in found if v.target.startswith("500 routes")]
    (held,) = [v for v in found if v.target.startswith("1,000 open sessions")]
    assert routes.met is True
    assert held.met is False
    assert routes.figures.startswith(
        "callgrind (asyncpg read): sessionscope 900 → 1,020 instructions/request (+13.3%), "
        "Depends(get_db) 1,000 → 1,100 (+10.0%); sessionscope's own share +2.2%; "
        "timed (sync read): sessionscope 800 → 1,000 µs (+25.0%)"
    )
    assert "sessionscope's own share +6.7%" in held.figures
    text = render(results)
    assert "| 500 route(s) | 1,100 | 1,020 |" in text
    assert "| 1,000 sessions open | 1,000 | 960 |" in text


@pytest.mark.parametrize(("on", "met"), [(1_020_000, True), (1_030_000, False)])
def test_on_off_verdict_takes_the_instruction_count_at_the_requests_own_rate(
    on: int, met: bool
) -> None:
    counted = InstructionResult(
        off_counts=[990_000, 1_010_000], on_counts=[on - 10_000, on + 10_000], requests=500
    )
    results = _results(
        overhead=OverheadResult(differences=[4.0, 5.0, 6.0], off_cpu=[500.0], requests=9),
        instructions=counted,
        off_supported=True,
    )
    (verdict,) = [v for v in verdicts(results) if v.target.startswith("metrics+logging")]
    # 2 % of a 500 µs request is 10 µs (met); 3 % is 15 µs, whatever the timing's median says.
    assert verdict.met is met
    assert f"≈ +{counted.estimate_us(500):.1f} µs" in verdict.figures
    assert "instructions per request off" in render(results)


def test_instruction_counts_subtract_the_short_batch_from_the_long_one_under_each_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake callgrind: start-up costs 10**9, a request 1,000 (off) or 1,050 (on) plus the seed.
    def fake_callgrind(arguments: list[str], seed: int) -> int:
        mode, requests, _warmup = arguments
        assert int(requests) in (10, 70)
        return 10**9 + int(requests) * ((1_050 if mode == "on" else 1_000) + seed)

    monkeypatch.setattr(instructions, "available", lambda: True)
    monkeypatch.setattr(instructions, "_callgrind", fake_callgrind)
    counted = instructions.measure_instructions(
        instructions.InstructionSettings(short=10, long=70, seeds=2)
    )
    assert counted is not None
    assert counted.off_counts == [1_000, 1_001]
    assert counted.on_counts == [1_050, 1_051]
    assert counted.differences == [50, 50]
    assert counted.requests == 60


def test_scenario_instruction_counts_are_per_request_for_each_contender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake callgrind: start-up 10**9, a read 1,000 (get_db) or 1,030 (ss_on) instructions,
    # an insert 1,200 or 1,150.
    per_request = {
        ("pg_aread", "get_db"): 1_000,
        ("pg_aread", "ss_on"): 1_030,
        ("pg_aread", "ss_state"): 990,
        ("pg_ainsert", "get_db"): 1_200,
        ("pg_ainsert", "ss_on"): 1_150,
        ("pg_ainsert", "ss_state"): 1_100,
    }

    def fake_callgrind(arguments: list[str], seed: int) -> int:
        kind, contender, scenario, requests, _warmup = arguments
        assert kind == "scenario"
        assert seed == 0
        return 10**9 + int(requests) * per_request[scenario, contender]

    monkeypatch.setattr(instructions, "available", lambda: True)
    monkeypatch.setattr(instructions, "_callgrind", fake_callgrind)
    counted = instructions.count_scenarios(
        ["get_db", "ss_on", "ss_state"],
        ["pg_aread", "pg_ainsert"],
        instructions.InstructionSettings(short=10, long=70),
    )
    assert counted is not None
    read, insert = counted
    assert (read.scenario, read.counts) == (
        "pg_aread",
        {"get_db": [1_000], "ss_on": [1_030], "ss_state": [990]},
    )
    assert read.ratio("ss_on", "get_db") == pytest.approx(1.03)
    assert insert.mean("ss_on") == 1_150
    assert insert.ratio("ss_off", "get_db") is None

    results = _results(
        inprocess=[
            Measurement("pg_aread", "get_db", [1000.0]),
            Measurement("pg_aread", "ss_on", [990.0]),
        ],
        scenario_instructions=counted,
    )
    (verdict,) = [v for v in verdicts(results) if v.target.startswith("asyncpg read")]
    assert verdict.met  # judged on the timing, as the issue sets it; the count stands beside it
    assert (
        "callgrind: 1,030 vs 1,000 instructions/request = 1.030x (via request.state.db: 0.990x)"
        in verdict.figures
    )
    text = render(results)
    assert "## Instructions per request" in text
    assert "| asyncpg insert | 1,200 (1.000x) | 1,150 (0.958x) | 1,100 (0.917x) |" in text


def test_the_db_less_count_is_shown_against_bare_fastapi_beside_the_timed_verdict() -> None:
    counted = [
        ScenarioInstructions("nodb", {"bare": [280_000.0], "ss_on": [308_000.0]}, requests=500),
        ScenarioInstructions("pg_aread", {"get_db": [1_000.0], "ss_on": [990.0]}, requests=500),
    ]
    results = _results(
        inprocess=[Measurement("nodb", "bare", [30.0]), Measurement("nodb", "ss_on", [39.0])],
        scenario_instructions=counted,
    )
    (verdict,) = [v for v in verdicts(results) if v.target.startswith("DB-less route")]
    assert verdict.met is False  # judged on the timing (1.30x), the count (1.10x) beside it
    assert "callgrind: 308,000 vs 280,000 instructions/request = 1.100x" in verdict.figures
    text = render(results)
    assert "| scenario | bare FastAPI (no sessions) | sessionscope (metrics+logging on) |" in text
    assert "| DB-less route | 280,000 (1.000x) | 308,000 (1.100x) | - |" in text
    assert "| asyncpg read | - | 990 (0.990x) | 1,000 (1.000x) |" in text
