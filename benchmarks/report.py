"""The results as Markdown: the comparison table, the targets, scaling, memory, end to end."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from .contenders import ALL, BY_KEY, PEERS
from .e2e import E2EMeasurement
from .results import Results
from .scenarios import BY_KEY as SCENARIOS
from .scenarios import SCENARIOS as SCENARIO_ORDER

BASELINE = "get_db"
SESSIONSCOPE = "ss_on"
SESSIONSCOPE_OFF = "ss_off"
SESSIONSCOPE_STATE = "ss_state"
AA = "get_db_aa"
EXTRA_MARK = "†"
ASYNC_SCENARIOS = ("aread", "ainsert", "pg_aread", "pg_ainsert")


@dataclass(frozen=True)
class Verdict:
    """One target: what it asks, the figures, and whether it is met (``None``: not measured)."""

    target: str
    figures: str
    met: bool | None


def _fmt(us: float) -> str:
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def _cell(results: Results, scenario: str, contender: str, cpu: bool = False) -> str:
    extra = contender in results.extra_contenders
    value = results.median(scenario, contender, extra=extra, cpu=cpu)
    if value is None:
        return "-"
    base = results.median(scenario, BASELINE, extra=extra, cpu=cpu)
    ratio = f" ({value / base:.2f}x)" if base else ""
    return f"{_fmt(value)}{ratio}{EXTRA_MARK if extra else ''}"


def _scenarios(results: Results) -> list[str]:
    seen = {m.scenario for m in [*results.inprocess, *results.extra]}
    return [s.key for s in SCENARIO_ORDER if s.key in seen]


def comparison_table(results: Results, *, cpu: bool = False) -> str:
    """Contenders x scenarios: median µs/request and the ratio to ``Depends(get_db)``.

    ``cpu``: CPU time (all threads of the process) instead of wall-clock time.
    """
    scenarios = _scenarios(results)
    measured = {m.contender for m in results.inprocess} | set(results.extra_contenders)
    header = "| contender | " + " | ".join(SCENARIOS[s].label for s in scenarios) + " |"
    lines = [header, "|---|" + "---:|" * len(scenarios)]
    for contender in ALL:
        if contender.key not in measured:
            continue
        cells = " | ".join(_cell(results, s, contender.key, cpu) for s in scenarios)
        lines.append(f"| {contender.label} | {cells} |")
    return "\n".join(lines)


def ratio_to_baseline(
    results: Results, scenario: str, contender: str, *, extra: bool | None = None
) -> float | None:
    """``contender``'s median over the baseline's, in the venv it was measured in (or ``extra``)."""
    if extra is None:
        extra = contender in results.extra_contenders
    value = results.median(scenario, contender, extra=extra)
    base = results.median(scenario, BASELINE, extra=extra)
    return None if value is None or not base else value / base


def _peers_in(results: Results, scenario: str) -> list[str]:
    keys = {m.contender for m in results.inprocess if m.scenario == scenario}
    keys |= {m.contender for m in results.extra if m.scenario == scenario} & set(
        results.extra_contenders
    )
    return sorted(k for k in keys if k in PEERS)


def _beats_peers(results: Results, scenario: str, ours: float) -> tuple[bool, str]:
    """Whether sessionscope beats every peer, each compared within one process's run.

    A peer of the extra venv is compared with sessionscope as measured in that same venv,
    interleaved with it, when it was (then both ratios are to that venv's own baseline);
    otherwise with sessionscope's ratio here.
    """
    parts, ok = [], True
    for peer in _peers_in(results, scenario):
        ratio = ratio_to_baseline(results, scenario, peer)
        if ratio is None:
            continue
        mine = ours
        text = f"{BY_KEY[peer].label} {ratio:.2f}x"
        there = ratio_to_baseline(results, scenario, SESSIONSCOPE, extra=True)
        if peer in results.extra_contenders and there is not None:
            mine = there
            # Shown, not judged: the peer's proxy solves no FastAPI dependency, nor does this.
            state = ratio_to_baseline(results, scenario, SESSIONSCOPE_STATE, extra=True)
            via_state = "" if state is None else f", via request.state.db {state:.2f}x"
            text += f" (sessionscope there {mine:.2f}x{EXTRA_MARK}{via_state})"
        parts.append(text)
        ok = ok and mine < ratio
    return ok, ", ".join(parts) or "no peer measured"


def _speed_target(results: Results, scenario: str, limit: float) -> Verdict:
    label = SCENARIOS[scenario].label
    target = f"{label}: ≤ {limit:.2f}x Depends(get_db) and faster than every peer"
    ours = ratio_to_baseline(results, scenario, SESSIONSCOPE)
    if ours is None:
        return Verdict(target, "not measured", None)
    beats, peers = _beats_peers(results, scenario, ours)
    value = results.median(scenario, SESSIONSCOPE)
    base = results.median(scenario, BASELINE)
    figures = f"sessionscope {_fmt(value or 0)} µs vs {_fmt(base or 0)} µs = {ours:.2f}x; {peers}"
    return Verdict(target, figures + _counted_text(results, scenario), ours <= limit and beats)


def aa_band(results: Results) -> float | None:
    """This run's noise band for the async columns: the widest gap between two identical
    ``Depends(get_db)`` contenders, ``max |A/A ratio - 1|`` over those columns."""
    gaps = [
        abs(ratio - 1)
        for scenario in ASYNC_SCENARIOS
        if (ratio := ratio_to_baseline(results, scenario, AA, extra=False)) is not None
    ]
    return max(gaps) if gaps else None


def _async_target(results: Results, scenario: str) -> Verdict:
    """An async column: within the A/A noise band of ``Depends(get_db)`` (or ≤ 1.00x when no
    A/A pair was measured), and faster than every peer."""
    band = aa_band(results)
    verdict = _speed_target(results, scenario, 1.00 if band is None else 1.00 + band)
    label = SCENARIOS[scenario].label
    if band is None:
        return verdict
    here = ratio_to_baseline(results, scenario, AA, extra=False)
    return Verdict(
        f"{label}: within the A/A noise band of Depends(get_db) and faster than every peer",
        f"{verdict.figures}; A/A band ±{band:.2f} (this column's A/A {here:.2f}x), so ≤ "
        f"{1 + band:.2f}x",
        verdict.met,
    )


def _counted_text(results: Results, scenario: str, base: str = BASELINE) -> str:
    """The scenario's instruction counts against ``base``'s, where callgrind counted them
    (asyncpg, the DB-less route)."""
    counted = next((c for c in results.scenario_instructions if c.scenario == scenario), None)
    if counted is None:
        return ""
    ours, off = counted.ratio(SESSIONSCOPE, base), counted.ratio(SESSIONSCOPE_OFF, base)
    if ours is None:
        return ""
    state = counted.ratio(SESSIONSCOPE_STATE, base)
    others = [
        f"{label}: {ratio:.3f}x"
        for label, ratio in (("off", off), ("via request.state.db", state))
        if ratio is not None
    ]
    return (
        f"; callgrind: {counted.mean(SESSIONSCOPE):,.0f} vs {counted.mean(base):,.0f} "
        f"instructions/request = {ours:.3f}x" + (f" ({', '.join(others)})" if others else "")
    )


def _nodb_target(results: Results) -> Verdict:
    target = "DB-less route ≤ 1.25x bare FastAPI"
    ours = results.median("nodb", SESSIONSCOPE)
    bare = results.median("nodb", "bare")
    if ours is None or bare is None:
        return Verdict(target, "not measured", None)
    off = results.median("nodb", SESSIONSCOPE_OFF)
    extra = f" (off: {off / bare:.2f}x)" if off is not None else ""
    same = results.median("nodb", BASELINE)
    # Depends(get_db)'s app runs exactly bare FastAPI's code on this route (no dependency, no
    # middleware): how far its ratio is from 1.00 shows how far this run's timing can be trusted.
    check = (
        f"; noise check: Depends(get_db), the same code as bare on this route, {same / bare:.2f}x"
        if same is not None
        else ""
    )
    return Verdict(
        target,
        f"{_fmt(ours)} µs vs {_fmt(bare)} µs = {ours / bare:.2f}x{extra}{check}"
        + _counted_text(results, "nodb", base="bare"),
        ours / bare <= 1.25,
    )


def _on_off_target(results: Results) -> Verdict:
    target = "metrics+logging on vs off: ≤ 10 µs/request (judged on CPU time)"
    if not results.off_supported:
        return Verdict(
            target, "DBSessionMiddleware has no metrics=/closed_log_level=None yet", None
        )
    paired = results.overhead
    in_table = _on_off_in_table(results)
    if paired is None:
        if in_table is None:
            return Verdict(target, "not measured", None)
        text, worst = in_table
        return Verdict(target, f"on - off, CPU µs (wall µs): {text}", worst <= 10)
    q1, q3 = paired.quartiles
    figures = (
        f"paired on a hop-free database route (see below): {paired.median:+.1f} µs "
        f"(quartiles {q1:+.1f} to {q3:+.1f}; off: {paired.off_median:.0f} µs)"
    )
    if in_table is not None:
        figures += f"; in the table above, on - off CPU µs (wall µs): {in_table[0]}"
    counted = results.instructions
    if counted is None:
        return Verdict(target, figures, paired.median <= 10)
    # The count does not move with the machine's load; the timing's quartiles do, by more than
    # the target: the verdict takes the count, at the request's own instructions per µs.
    estimate = counted.estimate_us(paired.off_median)
    figures = (
        f"callgrind: {counted.difference:+,.0f} instructions/request "
        f"({counted.difference / counted.off:+.1%} of {counted.off:,.0f}) ≈ {estimate:+.1f} µs; "
        + figures
    )
    return Verdict(target, figures, estimate <= 10)


def _on_off_in_table(results: Results) -> tuple[str, float] | None:
    """Each scenario's on - off (CPU and wall), and the largest CPU difference."""
    diffs = []
    for scenario in _scenarios(results):
        on, off = (results.median(scenario, k) for k in (SESSIONSCOPE, SESSIONSCOPE_OFF))
        cpu_on, cpu_off = (
            results.median(scenario, k, cpu=True) for k in (SESSIONSCOPE, SESSIONSCOPE_OFF)
        )
        if on is not None and off is not None and cpu_on is not None and cpu_off is not None:
            diffs.append((cpu_on - cpu_off, on - off, scenario))
    if not diffs:
        return None
    text = ", ".join(f"{SCENARIOS[s].label} {c:+.0f} ({w:+.0f})" for c, w, s in diffs)
    return text, max(c for c, _, _ in diffs)


def _scaling_target(results: Results, kind: str, low: int, high: int, what: str) -> Verdict:
    target = f"{what}: per-request cost changes < 5 %"
    rows = results.routes if kind == "routes" else results.open_sessions

    def get(contender: str, level: int) -> list[float]:
        for m in rows:
            if m.scenario == f"{kind}_{level}" and m.contender == contender:
                return m.samples
        return []

    counted = _counted_scaling(results, kind, low, high)
    ss_low, ss_high = get(SESSIONSCOPE, low), get(SESSIONSCOPE, high)
    if not ss_low or not ss_high:
        if counted is not None:
            return Verdict(target, counted[0], counted[1] < 0.05)
        return Verdict(target, "not measured", None)
    raw = statistics.median(ss_high) / statistics.median(ss_low) - 1
    figures = (
        f"timed (sync read): sessionscope {_fmt(statistics.median(ss_low))} → "
        f"{_fmt(statistics.median(ss_high))} µs ({raw:+.1%})"
    )
    base_low, base_high = get(BASELINE, low), get(BASELINE, high)
    own = raw
    if base_low and base_high:
        shares = scaling_shares(ss_low, ss_high, base_low, base_high)
        own = statistics.median(shares)
        figures += (
            f"; Depends(get_db) {_fmt(statistics.median(base_low))} → "
            f"{_fmt(statistics.median(base_high))} µs "
            f"({statistics.median(base_high) / statistics.median(base_low) - 1:+.1%}); "
            f"sessionscope's own share {own:+.1%} (median of {len(shares)} rounds, "
            f"{min(shares):+.1%} to {max(shares):+.1%})"
        )
    if counted is None:
        return Verdict(target, figures, own < 0.05)
    # The rounds' shares spread over tens of %, the count by about a percent: it decides.
    text, counted_own = counted
    return Verdict(target, f"{text}; {figures}", counted_own < 0.05)


def _counted_scaling(results: Results, kind: str, low: int, high: int) -> tuple[str, float] | None:
    """The callgrind count of the scaling measurement, and sessionscope's own share of its
    change, where both contenders were counted at both levels."""
    found = {c.scenario: c for c in results.scaling_instructions}
    at_low, at_high = found.get(f"{kind}_{low}"), found.get(f"{kind}_{high}")
    if at_low is None or at_high is None:
        return None
    figures = [(at_low.mean(key), at_high.mean(key)) for key in (SESSIONSCOPE, BASELINE)]
    (ss_low, ss_high), (base_low, base_high) = figures
    if ss_low is None or ss_high is None or base_low is None or base_high is None:
        return None
    (own,) = scaling_shares([ss_low], [ss_high], [base_low], [base_high])
    text = (
        f"callgrind (asyncpg read): sessionscope {ss_low:,.0f} → {ss_high:,.0f} "
        f"instructions/request ({ss_high / ss_low - 1:+.1%}), Depends(get_db) {base_low:,.0f} → "
        f"{base_high:,.0f} ({base_high / base_low - 1:+.1%}); sessionscope's own share {own:+.1%}"
    )
    return text, own


def scaling_shares(
    ss_low: list[float], ss_high: list[float], base_low: list[float], base_high: list[float]
) -> list[float]:
    """sessionscope's own growth per round: its change minus ``Depends(get_db)``'s change in the
    same round, relative to its low figure (the four batches of a round ran back to back)."""
    return [
        ((sh - sl) - (bh - bl)) / sl
        for sl, sh, bl, bh in zip(ss_low, ss_high, base_low, base_high, strict=False)
    ]


def _rss_target(results: Results) -> Verdict:
    rss = results.rss
    if rss is None:
        return Verdict("RSS after 200k requests within 5 % of after 10k", "not measured", None)
    target = f"RSS after {rss.total:,} requests within 5 % of after {rss.checkpoint:,}"
    figures = f"{rss.rss_checkpoint_mib:.1f} MiB → {rss.rss_total_mib:.1f} MiB ({rss.growth:+.1%})"
    return Verdict(target, figures, abs(rss.growth) <= 0.05)


def _e2e_of(results: Results, scenario: str, contender: str) -> E2EMeasurement | None:
    for m in results.e2e:
        if m.scenario == scenario and m.contender == contender and m.runs:
            return m
    return None


def paired_e2e_ratios(
    ours: E2EMeasurement, base: E2EMeasurement
) -> tuple[list[float], list[float]]:
    """Requests/s and p99 ratios of ``ours`` to ``base``, one per round (both ran in it)."""
    pairs = list(zip(ours.runs, base.runs, strict=False))
    return [o.rps / b.rps for o, b in pairs], [o.p99_ms / b.p99_ms for o, b in pairs]


def _e2e_targets(results: Results) -> list[Verdict]:
    verdicts = []
    for scenario in ("read", "insert"):
        target = f"end to end ({scenario}): rps ≥ 0.95x Depends(get_db), p99 no worse"
        ours, base = _e2e_of(results, scenario, SESSIONSCOPE), _e2e_of(results, scenario, BASELINE)
        if ours is None or base is None:
            verdicts.append(Verdict(target, "not measured", None))
            continue
        # Each round loads both servers back to back: the machine's drift between rounds
        # (±10-25 % here) cancels in the per-round ratio, not in the medians of each.
        rps, p99 = paired_e2e_ratios(ours, base)
        o, b = ours.median, base.median
        figures = (
            f"{o.rps:,.0f} vs {b.rps:,.0f} rps, p99 {o.p99_ms:,.1f} vs {b.p99_ms:,.1f} ms; "
            f"per round: rps {statistics.median(rps):.2f}x ({min(rps):.2f}-{max(rps):.2f}), "
            f"p99 {statistics.median(p99):.2f}x ({min(p99):.2f}-{max(p99):.2f}), "
            f"p99 no worse in {sum(r <= 1.0 for r in p99)} of {len(p99)} rounds"
        )
        met = statistics.median(rps) >= 0.95 and statistics.median(p99) <= 1.0
        verdicts.append(Verdict(target, figures, met))
    return verdicts


def verdicts(results: Results) -> list[Verdict]:
    """Every target of the issue, checked against the figures."""
    found = [
        _nodb_target(results),
        _speed_target(results, "read", 0.90),
        _speed_target(results, "insert", 1.00),
    ]
    for scenario in ASYNC_SCENARIOS:
        if any(m.scenario == scenario for m in results.inprocess):
            found.append(_async_target(results, scenario))
    found.append(_on_off_target(results))
    found.extend(_e2e_targets(results))
    found.append(_scaling_target(results, "routes", 1, 500, "500 routes vs 1"))
    found.append(_scaling_target(results, "open", 10, 1000, "1,000 open sessions vs 10"))
    found.append(_rss_target(results))
    return found


def targets_table(found: Iterable[Verdict]) -> str:
    """The targets as a Markdown table."""
    mark = {True: "met", False: "**missed**", None: "not measured"}
    lines = ["| target | figures | result |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.figures} | {mark[v.met]} |" for v in found]
    return "\n".join(lines)


def _scaling_table(results: Results) -> str:
    rows = [*results.routes, *results.open_sessions]
    if not rows:
        return "_not measured_"
    lines = ["| contender | measurement | µs/request (median) |", "|---|---|---:|"]
    for m in rows:
        lines.append(f"| {BY_KEY[m.contender].label} | {_level(m.scenario)} | {_fmt(m.median)} |")
    return "\n".join(lines)


def _level(scenario: str) -> str:
    """A scaling measurement's level in words: ``routes_500`` is "500 route(s)"."""
    kind, level = scenario.split("_")
    return f"{int(level):,} route(s)" if kind == "routes" else f"{int(level):,} sessions open"


def _e2e_table(results: Results) -> str:
    if not results.e2e:
        return "_not measured_"
    lines = [
        "| scenario | contender | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in results.e2e:
        if not m.runs:
            continue
        r = m.median
        lines.append(
            f"| {m.scenario} | {BY_KEY[m.contender].label} | {r.rps:,.0f} | "
            f"{r.p50_ms:,.1f} | {r.p99_ms:,.1f} | {r.errors} |"
        )
    return "\n".join(lines)


def _machine(results: Results) -> str:
    m = results.machine
    lines = [
        f"- nproc: {m['nproc']}; CPU: {m['cpu']}; {m['os']}",
        f"- Python {m['python']} (benchmark venv)",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
    ]
    if results.extra_machine is not None:
        x = results.extra_machine
        lines.append(
            f"- extra venv{EXTRA_MARK}: Python {x['python']}; "
            + ", ".join(f"{k} {v}" for k, v in x["packages"].items())
        )
    if results.postgres_version:
        lines.append(f"- PostgreSQL {results.postgres_version} on loopback")
    if m.get("wrk"):
        lines.append(f"- load generator: {m['wrk']}")
    return "\n".join(lines)


def render(
    results: Results, *, found: list[Verdict] | None = None, before_after: str | None = None
) -> str:
    """The whole RESULTS.md; ``before_after``: the section comparing a saved earlier run."""
    found = verdicts(results) if found is None else found
    s = results.settings
    contender_notes = "\n".join(
        f"- **{c.label}**: {c.note}" for c in ALL if c.note and _measured(results, c.key)
    )
    skipped = "\n".join(f"- `{k}`: {v}" for k, v in results.skipped.items()) or "- none"
    notes = "\n".join(f"- {n}" for n in results.notes) or "- none"
    rss = results.rss
    rss_line = (
        f"{rss.contender}: {rss.rss_checkpoint_mib:.1f} MiB after {rss.checkpoint:,} requests, "
        f"{rss.rss_total_mib:.1f} MiB after {rss.total:,} ({rss.growth:+.2%}; {rss.seconds:.0f} s)"
        if rss
        else "_not measured_"
    )
    return f"""# sessionscope benchmarks

Written by `make bench` (`bash benchmarks/run.sh`); do not edit by hand.
Settings: {", ".join(f"{k}={v}" for k, v in s.items())}.

## Machine

{_machine(results)}

## In process: µs/request and ratio to `Depends(get_db)`

Median of {s.get("rounds")} interleaved rounds of {s.get("requests")} requests each
({s.get("nodb_requests")} for the DB-less route), after {s.get("warmup")} warm-up requests.

The app is called directly (no server, no sockets), one request at a time. Sync scenarios use
pysqlite on a SQLite file (WAL), async ones aiosqlite, `asyncpg` ones the local PostgreSQL.
Lower is better; the ratio is to the `Depends(get_db)` row of the same column (for async
columns: an `async def get_db()` yielding an `AsyncSession`).
{EXTRA_MARK} = measured in the extra venv (another Python), against that process's own
`Depends(get_db)`: compare its ratio, not its µs.

{comparison_table(results)}

{contender_notes}

CPU µs/request (process time of the event loop and the worker threads, same runs): less
sensitive than wall time to how long a thread hop waits for the scheduler on a busy machine.

{comparison_table(results, cpu=True)}

Not measured:
{skipped}

## Targets

{targets_table(found)}

{before_after or ""}## Metrics and logging: on vs off

{_overhead_section(results)}

{_scenario_instructions_section(results)}## Scaling

{_scaling_table(results)}

Route matching in Starlette is linear in the number of routes, so the many-routes figure of
every contender includes FastAPI's own extra cost; "sessionscope's own share" subtracts the
change `Depends(get_db)` sees in the same run.
{_scaling_instructions_text(results)}
## Memory

{rss_line}

## End to end

uvicorn (1 worker) on loopback, PostgreSQL (psycopg, sync routes), {s.get("e2e_connections")}
connections, {s.get("e2e_duration")} s per run after a warm-up, {s.get("e2e_rounds")} round(s),
the contenders interleaved (each round loads every server once, back to back); requests/s, p50
and p99 are each the median over the rounds, errors the sum. The target compares sessionscope to
`Depends(get_db)` round by round (the median of the per-round ratios), as the machine drifts
between rounds by more than the contenders differ.

{_e2e_table(results)}

Fastest peer (sync read, in process): {_peer_label(results)}.

## Notes

{notes}
"""


def _overhead_section(results: Results) -> str:
    paired = results.overhead
    if paired is None:
        return "_not measured_"
    q1, q3 = paired.quartiles
    return (
        "A database request in the table above takes 0.7 to 1.3 ms and moves by about ±5 % from "
        "one batch to the next, several times the 10 µs target, so the on/off rows there cannot "
        "judge it. Here sessionscope on and off serve one database route with nothing else in "
        "the way (an `async def` route reading one row through the request's sync `Session` "
        "from an in-memory SQLite database behind a `QueuePool`: no thread hop, no socket, no "
        "file), in "
        f"{len(paired.differences)} pairs of {paired.requests}-request batches, alternating. "
        f"On minus off, CPU µs per request: median {paired.median:+.1f}, quartiles "
        f"{q1:+.1f} to {q3:+.1f}; the request itself costs {paired.off_median:.0f} µs with "
        "them off."
    ) + _instructions_text(results)


def _scenario_instructions_section(results: Results) -> str:
    if not results.scenario_instructions:
        return ""
    contenders = list(
        dict.fromkeys(k for counted in results.scenario_instructions for k in counted.counts)
    )
    lines = [
        "## Instructions per request",
        "",
        "Every contender sends the same statements on asyncpg, so their wall times differ by",
        "less than they move between runs here; on the DB-less route two copies of one app",
        "time 15 % or more apart. Counted with callgrind instead (the app's process only: not",
        "PostgreSQL's work, nor the kernel's; a short and a long batch in separate processes,",
        "garbage collection and the once-a-second work held still, see",
        "`benchmarks/instructions.py`), ratio to `Depends(get_db)` (DB-less route: to bare",
        "FastAPI):",
        "",
        "| scenario | " + " | ".join(BY_KEY[k].label for k in contenders) + " |",
        "|---|" + "---:|" * len(contenders),
    ]
    for counted in results.scenario_instructions:
        base = "bare" if counted.scenario == "nodb" else BASELINE
        cells = []
        for key in contenders:
            mean, ratio = counted.mean(key), counted.ratio(key, base)
            cells.append("-" if mean is None or ratio is None else f"{mean:,.0f} ({ratio:.3f}x)")
        lines.append(f"| {SCENARIOS[counted.scenario].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def _instructions_text(results: Results) -> str:
    counted = results.instructions
    if counted is None:
        return ""
    return (
        "\n\nCounted with callgrind on the same route (a short and a long batch in separate "
        f"processes, {counted.requests} requests apart, under {len(counted.differences)} hash "
        "seeds; garbage collection and the once-a-second work held still, see "
        "`benchmarks/instructions.py`): "
        f"{counted.off:,.0f} instructions per request off, {counted.on:,.0f} on (means over "
        f"the seeds), {counted.difference:+,.0f} ({counted.difference / counted.off:+.1%}; "
        f"per seed {min(counted.differences):+,.0f} to {max(counted.differences):+,.0f}). "
        "The target's "
        "verdict takes this count at the request's own rate of instructions per µs, since the "
        "timing's quartiles are wider than the target."
    )


def _scaling_instructions_text(results: Results) -> str:
    counted = results.scaling_instructions
    if not counted:
        return ""
    lines = [
        "",
        "The timed rounds above move sessionscope's own share by tens of percent from one",
        "round to the next, several times the 5 % in question. The targets' verdicts take the",
        "count instead: the asyncpg read (no worker thread: every instruction counted is the",
        "request's own) under callgrind at each level, as in the instruction counts above",
        "(a short and a long batch in separate processes), instructions per request:",
        "",
        "| measurement | " + " | ".join(BY_KEY[k].label for k in counted[0].counts) + " |",
        "|---|" + "---:|" * len(counted[0].counts),
    ]
    for level in counted:
        cells = [f"{level.mean(k) or 0:,.0f}" for k in level.counts]
        lines.append(f"| {_level(level.scenario)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _peer_label(results: Results) -> str:
    return BY_KEY[results.e2e_peer].label if results.e2e_peer else "-"


def _measured(results: Results, key: str) -> bool:
    return any(m.contender == key for m in [*results.inprocess, *results.extra])
