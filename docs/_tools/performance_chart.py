"""Draw the performance page's chart from ``benchmarks/RESULTS.md``.

Reads the first table of ``make bench``'s results (wall time per request, as ratios to
``Depends(get_db)``) and writes ``docs/_static/performance.svg``: one group of bars per route, one
bar per contender. ``--check`` exits 1 when the committed chart differs from what the results give.
"""

from __future__ import annotations

import argparse
import re
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CHART = ROOT / "docs" / "_static" / "performance.svg"
CONTENDERS = {
    "Depends(get_db)": "#9e9e9e",
    "sessionscope (metrics+logging on)": "#1565c0",
    "fastapi-sqla": "#ef6c00",
    "FastAPI-SQLAlchemy": "#6a1b9a",
    "fastapi-async-sqlalchemy": "#2e7d32",
    "advanced-alchemy (autocommit)": "#c62828",
}
RATIO = re.compile(r"\((\d+(?:\.\d+)?)x\)")
MAX_RATIO = 2.0


def read_table(text: str) -> tuple[list[str], dict[str, list[float | None]]]:
    """The routes (columns) and each contender's ratios from the first results table."""
    section = text.split("\n## In process", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n|", 1)[1].split("\n\n", 1)[0]  # the first table: wall time
    rows = ["|" + table.splitlines()[0], *table.splitlines()[1:]]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    routes = header[2:]  # the DB-less route is against bare FastAPI: left out of the chart
    ratios: dict[str, list[float | None]] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if cells[0] not in CONTENDERS:
            continue
        values: list[float | None] = []
        for cell in cells[2:]:
            found = RATIO.search(cell)
            values.append(float(found.group(1)) if found else None)
        ratios[cells[0]] = values
    return routes, ratios


def draw(routes: list[str], ratios: dict[str, list[float | None]]) -> str:
    """A grouped bar chart as SVG text (no dependency, stable output)."""
    bar, gap, left, top, height = 12, 34, 60, 40, 260
    group = bar * len(ratios) + gap
    width = left + group * len(routes) + 280
    scale = height / MAX_RATIO
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 30}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="20" font-size="13">Time per request, ratio to Depends(get_db) '
        "(lower is better)</text>",
    ]
    for tick in (0.5, 1.0, 1.5, 2.0):
        y = top + height - tick * scale
        dash = "" if tick == 1.0 else ' stroke-dasharray="3,3"'
        out.append(
            f'<line x1="{left}" x2="{left + group * len(routes)}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#bbb"{dash}/><text x="{left - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{tick:.1f}x</text>'
        )
    for r, route in enumerate(routes):
        x0 = left + r * group + gap / 2
        for c, (name, values) in enumerate(ratios.items()):
            value = values[r]
            if value is None:
                continue
            shown = min(value, MAX_RATIO)
            y = top + height - shown * scale
            out.append(
                f'<rect x="{x0 + c * bar:.1f}" y="{y:.1f}" width="{bar - 1}" '
                f'height="{shown * scale:.1f}" fill="{CONTENDERS[name]}">'
                f"<title>{escape(name)}: {value:.2f}x</title></rect>"
            )
        label_x = x0 + bar * len(ratios) / 2
        out.append(
            f'<text x="{label_x:.1f}" y="{top + height + 16}" text-anchor="middle">'
            f"{escape(route)}</text>"
        )
    for c, name in enumerate(ratios):
        y = top + c * 18
        x = left + group * len(routes) + 16
        out.append(
            f'<rect x="{x}" y="{y}" width="12" height="12" fill="{CONTENDERS[name]}"/>'
            f'<text x="{x + 18}" y="{y + 10}">{escape(name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the chart is out of date")
    args = parser.parse_args(argv)
    svg = draw(*read_table(RESULTS.read_text()))
    if args.check:
        if not CHART.exists() or CHART.read_text() != svg:
            print("out of date: run `python docs/_tools/performance_chart.py`", file=sys.stderr)
            return 1
        return 0
    CHART.parent.mkdir(exist_ok=True)
    CHART.write_text(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
