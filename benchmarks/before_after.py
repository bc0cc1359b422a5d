"""Two runs side by side: the headline figures of a run, saved as JSON, and a table comparing a
saved run (before a change) with this one (after it).

The figures compared are ratios to a contender of the same run (``Depends(get_db)``, bare
FastAPI) and instruction counts, so two runs on one machine can be compared even though each
run's absolute timings drift with the machine's load.

    # the code before the change, in a venv of its own (same harness):
    python -m benchmarks all --headline before.json --output /dev/null --label "before"
    # the code after it:
    python -m benchmarks all --before before.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import (
    ASYNC_SCENARIOS,
    BASELINE,
    SESSIONSCOPE,
    SESSIONSCOPE_OFF,
    aa_band,
    ratio_to_baseline,
)
from .results import Results
from .scenarios import BY_KEY as SCENARIOS

Headline = dict[str, Any]


def headline(results: Results, label: str) -> Headline:
    """The figures the targets judge, as plain numbers (``None``: not measured)."""
    figures: dict[str, float | None] = {}
    ours, bare = results.median("nodb", SESSIONSCOPE), results.median("nodb", "bare")
    figures["nodb"] = None if ours is None or not bare else ours / bare
    for scenario in ("read", "insert", *ASYNC_SCENARIOS):
        figures[scenario] = ratio_to_baseline(results, scenario, SESSIONSCOPE, extra=False)
        on = results.median(scenario, SESSIONSCOPE, cpu=True)
        base = results.median(scenario, BASELINE, cpu=True)
        figures[f"{scenario}_cpu"] = None if on is None or not base else on / base
    figures["aa_band"] = aa_band(results)
    counted = results.instructions
    if counted is not None:
        figures["on_off_instructions"] = counted.difference
        if results.overhead is not None:
            figures["on_off_us"] = counted.estimate_us(results.overhead.off_median)
    for each in results.scenario_instructions:
        base_key = "bare" if each.scenario == "nodb" else BASELINE
        for key, name in ((SESSIONSCOPE, "on"), (SESSIONSCOPE_OFF, "off"), (base_key, "base")):
            figures[f"instructions_{each.scenario}_{name}"] = each.mean(key)
    return {"label": label, "figures": figures}


def save(results: Results, label: str, path: Path) -> None:
    """Write :func:`headline` to ``path``."""
    path.write_text(json.dumps(headline(results, label), indent=1) + "\n")


def load(path: Path) -> Headline:
    """A headline saved by :func:`save`."""
    data: Headline = json.loads(path.read_text())
    return data


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(figure, target, before, after, verdict on after) for each figure both runs have."""

    def limit_row(key: str, what: str, limit: float) -> tuple[str, str, str, str, str]:
        value = after.get(key)
        verdict = (
            "not measured"
            if value is None
            else "met"
            if value <= limit
            else f"**missed** by {value - limit:.2f}x"
        )
        return what, f"≤ {limit:.2f}x", _x(before.get(key)), _x(value), verdict

    rows = [limit_row("nodb", "DB-less route / bare FastAPI", 1.25)]
    rows.append(limit_row("read", "sync read / Depends(get_db)", 0.90))
    rows.append(limit_row("read_cpu", "… in CPU time", 0.90))
    rows.append(limit_row("insert", "sync insert / Depends(get_db)", 1.00))
    rows.append(limit_row("insert_cpu", "… in CPU time", 1.00))
    band = after.get("aa_band")
    for scenario in ASYNC_SCENARIOS:
        label = SCENARIOS[scenario].label
        rows.append(limit_row(scenario, f"{label} / Depends(get_db)", 1 + (band or 0.0)))
    rows.append(
        (
            "A/A band (widest gap of two identical `Depends(get_db)`, async columns)",
            "",
            "-" if before.get("aa_band") is None else f"±{before['aa_band']:.2f}",
            "-" if band is None else f"±{band:.2f}",
            "",
        )
    )
    on_off = after.get("on_off_us")
    rows.append(
        (
            "metrics+logs on - off, instructions/request (callgrind)",
            "≤ 10 µs",
            _n(before.get("on_off_instructions")),
            _n(after.get("on_off_instructions")),
            "not measured"
            if on_off is None
            else f"{'met' if on_off <= 10 else '**missed**'} (≈ {on_off:.1f} µs)",
        )
    )
    for scenario in ("nodb", "pg_aread", "pg_ainsert"):
        for name, who in (("on", "sessionscope"), ("base", "reference")):
            key = f"instructions_{scenario}_{name}"
            if key in after or key in before:
                reference = "bare FastAPI" if scenario == "nodb" else "Depends(get_db)"
                label = SCENARIOS[scenario].label
                what = who if name == "on" else reference
                rows.append(
                    (
                        f"{label}: instructions/request, {what} (callgrind)",
                        "",
                        _n(before.get(key)),
                        _n(after.get(key)),
                        _change(before.get(key), after.get(key)),
                    )
                )
    return rows


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or not before:
        return ""
    return f"{after - before:+,.0f} ({after / before - 1:+.1%})"


def section(before: Headline, results: Results, label: str) -> str:
    """The Markdown table of ``before`` against this run."""
    after = headline(results, label)["figures"]
    lines = [
        f"| figure | target | {before['label']} | {label} | after: verdict or change |",
        "|---|---|---:|---:|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in _rows(before["figures"], after)]
    return "\n".join(lines)
