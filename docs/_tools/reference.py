"""Write the metrics and logs reference pages of the docs from ``sessionscope.catalogue``.

``python docs/_tools/reference.py`` writes ``docs/metrics.md`` and ``docs/logs.md``;
``--check`` exits 1 when either differs from what the catalogue gives (a metric or an event was
added, renamed or described anew without regenerating the pages).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sessionscope.catalogue import CATALOGUE, DEFAULT_NAMESPACE, EVENTS, Event, Metric

DOCS = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from sessionscope.catalogue by docs/_tools/reference.py -->\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _buckets(metric: Metric) -> str:
    return ", ".join(f"{b:g}" for b in metric.buckets)


def metrics_page() -> str:
    """The metrics reference: one row per exported family."""
    lines = [
        HEADER,
        "# Metrics reference",
        "",
        f"Every metric has the label `db` (the middleware's `name`). Names are shown with the "
        f"default namespace `{DEFAULT_NAMESPACE}`; `namespace=` changes the prefix. Under "
        "`PROMETHEUS_MULTIPROC_DIR`, gauges combine across workers as the last column says.",
        "",
        "| Metric | Type | Labels | Unit | Help | Buckets / multiprocess mode |",
        "|---|---|---|---|---|---|",
    ]
    for metric in CATALOGUE:
        extra = _buckets(metric) if metric.kind == "histogram" else metric.multiprocess_mode
        lines.append(
            f"| `{metric.exported()}` | {metric.kind} | "
            f"{', '.join(f'`{label}`' for label in metric.all_labels)} | {metric.unit} | "
            f"{_cell(metric.help)} | {extra} |"
        )
    return "\n".join(lines) + "\n"


def logs_page() -> str:
    """The logs reference: one section per event."""
    lines = [
        HEADER,
        "# Logs reference",
        "",
        "Every event sessionscope emits, its level and its keys. How the events reach your "
        "logs (standard `logging` or structlog) is in [Logging](logging.md). A key followed by "
        "a condition in parentheses is there only then.",
        "",
        "| Event | Level | Keys | When |",
        "|---|---|---|---|",
    ]
    for event in EVENTS:
        keys = ", ".join(_key(event, field) for field in event.fields)
        lines.append(f"| `{event.name}` | {event.level} | {keys} | {_cell(event.help)} |")
    return "\n".join(lines) + "\n"


def _key(event: Event, field: str) -> str:
    when = event.when_present(field)
    return f"`{field}`" if when is None else f"`{field}` ({when})"


PAGES = {"metrics.md": metrics_page, "logs.md": logs_page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, build in PAGES.items():
        path = DOCS / name
        text = build()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run `python docs/_tools/reference.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
