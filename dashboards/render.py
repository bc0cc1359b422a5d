"""Draw what each dashboard row shows, from the data of a real end-to-end run.

    SESSIONSCOPE_E2E_DUMP=/tmp/e2e.json python -m pytest tests/test_e2e_prometheus.py
    pip install matplotlib
    python dashboards/render.py /tmp/e2e.json          # writes dashboards/img/<row>.png

The dump holds, for every panel query of ``grafana/sessionscope.json``, the range result
Prometheus returned while scraping the demo app under load. One PNG per dashboard row, panels in
the dashboard's order; an approximation of Grafana's rendering, not a screenshot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

HERE = Path(__file__).resolve().parent
OUT = HERE / "img"
COLUMNS = {"Overview": 3}
UNIT_LABELS = {"s": "seconds", "ops": "per second", "percentunit": "ratio", "short": ""}


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text.strip() or "value"


def series(target: dict[str, Any], start: float) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for result in target["range"]:
        times = [float(t) - start for t, _ in result["values"]]
        values = [float(v) for _, v in result["values"]]
        out.append((legend(target["legend"], result["metric"]), times, values))
    return out


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "percentunit":
        return f"{value:.0%}"
    if unit == "s":
        return f"{value:.2f} s" if value < 60 else f"{value / 60:.1f} min"
    if unit == "ops":
        return f"{value:.2f}/s"
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def draw_stat(ax: Axes, panel: dict[str, Any], start: float) -> None:
    found = [s for t in panel["targets"] for s in series(t, start)]
    ax.set_xticks([])
    ax.set_yticks([])
    if not found:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14)
        return
    _, times, values = found[0]
    last = values[-1]
    red = last > 0 and panel["title"] not in ("Open sessions", "Oldest open session")
    ax.set_facecolor("#f2c7c7" if red else "#d6efd6")
    ax.plot(times, values, color="#555555", linewidth=1)
    ax.text(
        0.5,
        0.5,
        fmt(last, panel["unit"]),
        ha="center",
        va="center",
        fontsize=22,
        transform=ax.transAxes,
        fontweight="bold",
    )


def draw_timeseries(ax: Axes, panel: dict[str, Any], start: float, bars: bool = False) -> None:
    drawn: list[tuple[str, list[float], list[float], bool]] = []
    for target in panel["targets"]:
        dashed = any(w in target["legend"] for w in ("max", "threshold", "pool_timeout"))
        drawn.extend((name, t, v, dashed) for name, t, v in series(target, start))
    hidden = 0
    if len(drawn) > 8:  # like Grafana's "hide series with only zeros", to keep a legend
        kept = [d for d in drawn if any(v for v in d[2] if not math.isnan(v))]
        hidden = len(drawn) - len(kept)
        drawn = kept
    for name, times, values, dashed in drawn:
        if bars:
            line = ax.step(times, values, where="post", label=name, linewidth=1)[0]
            ax.fill_between(times, values, step="post", alpha=0.3, color=line.get_color())
        else:
            ax.plot(times, values, label=name, linestyle="--" if dashed else "-", linewidth=1.2)
    if drawn:
        title = f"{hidden} all-zero series hidden" if hidden else None
        ax.legend(fontsize=6, loc="upper left", ncol=2 if len(drawn) > 5 else 1, title=title,
                  title_fontsize=6)  # fmt: skip
    ax.set_xlabel("seconds into the run", fontsize=7)
    ax.set_ylabel(UNIT_LABELS.get(panel["unit"], panel["unit"]), fontsize=7)


def draw_heatmap(ax: Axes, panel: dict[str, Any], start: float) -> None:
    rows = series(panel["targets"][0], start)
    if not rows:
        return
    ordered = sorted(rows, key=lambda r: float(r[0]) if r[0] != "+Inf" else math.inf)
    length = min(len(r[2]) for r in ordered)
    cumulative = [[0.0 if math.isnan(v) else v for v in r[2][:length]] for r in ordered]
    # Prometheus buckets are cumulative; Grafana's heatmap (format: heatmap) shows each bucket's
    # own count, the difference with the bucket below.
    grid = [
        [max(0.0, v - (cumulative[i - 1][j] if i else 0.0)) for j, v in enumerate(row)]
        for i, row in enumerate(cumulative)
    ]
    ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest")
    ax.set_yticks(range(len(ordered)))
    ax.set_yticklabels([r[0] for r in ordered], fontsize=5)
    ax.set_ylabel("bucket (le)", fontsize=7)
    ax.set_xlabel("seconds into the run", fontsize=7)


def draw_table(ax: Axes, panel: dict[str, Any], start: float) -> None:
    found = [(name, values[-1]) for t in panel["targets"] for name, _, values in series(t, start)]
    found = sorted((f for f in found if not math.isnan(f[1])), key=lambda f: f[1])
    ax.barh([f[0] for f in found], [f[1] for f in found], color="#6c8ebf")
    ax.tick_params(axis="y", labelsize=6)
    ax.set_xlabel(UNIT_LABELS.get(panel["unit"], panel["unit"]), fontsize=7)


def render(dump: dict[str, Any], out: Path) -> list[Path]:
    start = float(dump["start"])
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in dump["panels"]:
        if panel["type"] == "row":
            rows.append((panel["title"], []))
        else:
            rows[-1][1].append(panel)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for title, panels in rows:
        columns = COLUMNS.get(title, 2)
        lines = math.ceil(len(panels) / columns)
        height = 2.0 if title == "Overview" else 3.0
        fig, axes = plt.subplots(
            lines, columns, figsize=(6 * columns, height * lines), squeeze=False
        )
        for ax, panel in zip(axes.flat, panels, strict=False):
            ax.set_title(panel["title"], fontsize=9)
            ax.tick_params(labelsize=6)
            kind = panel["type"]
            if kind in ("stat", "gauge"):
                draw_stat(ax, panel, start)
            elif kind == "heatmap":
                draw_heatmap(ax, panel, start)
            elif kind == "table":
                draw_table(ax, panel, start)
            else:
                bars = all("increase(" in t["expr"] for t in panel["targets"])
                draw_timeseries(ax, panel, start, bars=bars)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(f"Session leaks & pool health: {title}", fontsize=11)
        fig.tight_layout()
        path = out / f"{title.lower()}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", type=Path, help="the file SESSIONSCOPE_E2E_DUMP named")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for path in render(json.loads(args.dump.read_text()), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
