"""``python -m benchmarks [all|inprocess|rss] [options]``; every option has an env variable.

``all`` (the default) measures everything, prints the comparison table and the targets, and
writes ``benchmarks/RESULTS.md``. ``--quick`` shrinks every count for a fast look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from . import before_after
from . import contenders as c
from .e2e import E2ESettings
from .inprocess import RunSettings, run_inprocess
from .instructions import InstructionSettings
from .logging_setup import configure_production_logging
from .machine import describe
from .overhead import OverheadSettings
from .report import comparison_table, render, targets_table, verdicts
from .results import Results, dump_measurements
from .rss import measure_rss
from .scaling import ScalingSettings
from .scenarios import BY_KEY as SCENARIOS_BY_KEY
from .scenarios import SCENARIOS
from .suite import SuiteSettings, run_suite

HERE = Path(__file__).resolve().parent

# option: (env variable, default, quick default)
_COUNTS: dict[str, tuple[str, float, float]] = {
    "rounds": ("BENCH_ROUNDS", 15, 3),
    "requests": ("BENCH_REQUESTS", 250, 40),
    "nodb_requests": ("BENCH_NODB_REQUESTS", 2000, 200),
    "warmup": ("BENCH_WARMUP", 100, 20),
    "instances": ("BENCH_INSTANCES", 3, 2),
    "overhead_pairs": ("BENCH_OVERHEAD_PAIRS", 200, 10),
    "overhead_requests": ("BENCH_OVERHEAD_REQUESTS", 300, 100),
    "instruction_requests": ("BENCH_INSTRUCTION_REQUESTS", 600, 120),
    "instruction_seeds": ("BENCH_INSTRUCTION_SEEDS", 3, 1),
    "scaling_rounds": ("BENCH_SCALING_ROUNDS", 6, 2),
    "scaling_requests": ("BENCH_SCALING_REQUESTS", 200, 40),
    "rss_total": ("BENCH_RSS_TOTAL", 200_000, 20_000),
    "rss_checkpoint": ("BENCH_RSS_CHECKPOINT", 10_000, 2_000),
    "e2e_duration": ("BENCH_E2E_DURATION", 8, 3),
    "e2e_rounds": ("BENCH_E2E_ROUNDS", 6, 1),
    "e2e_connections": ("BENCH_E2E_CONNECTIONS", 64, 64),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("command", nargs="?", default="all", choices=("all", "inprocess", "rss"))
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK") == "1",
        help="small counts everywhere (env BENCH_QUICK=1)",
    )
    for name, (env, default, quick) in _COUNTS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(default),
            default=None,
            help=f"env {env}; default {default:,}, --quick {quick:,}",
        )
    parser.add_argument(
        "--extra-python",
        default=os.environ.get("BENCH_EXTRA_PYTHON") or None,
        help="python of a venv for peers needing another Python (env BENCH_EXTRA_PYTHON)",
    )
    parser.add_argument(
        "--skip",
        default=os.environ.get("BENCH_SKIP", ""),
        help=(
            "comma-separated parts to skip: inprocess, extra, overhead, instructions, "
            "nodb-instructions, pg-instructions, scaling, scaling-instructions, rss, e2e "
            "(env BENCH_SKIP)"
        ),
    )
    parser.add_argument("--contenders", help="inprocess: comma-separated contender keys")
    parser.add_argument("--scenarios", help="inprocess: comma-separated scenario keys")
    parser.add_argument("--json", type=Path, help="inprocess/rss: write the figures here")
    parser.add_argument("--total", type=int, help="rss: requests in all")
    parser.add_argument("--checkpoint", type=int, help="rss: requests before the first reading")
    parser.add_argument(
        "--output", type=Path, default=HERE / "RESULTS.md", help="where `all` writes Markdown"
    )
    parser.add_argument(
        "--headline", type=Path, help="all: save the figures the targets judge here (JSON)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=os.environ.get("BENCH_BEFORE"),
        help="all: a --headline file of an earlier run, compared with this one in RESULTS.md "
        "(env BENCH_BEFORE)",
    )
    parser.add_argument(
        "--label", default="this run", help="all: this run's name in the before/after table"
    )
    return parser


def _counts(args: argparse.Namespace) -> dict[str, float]:
    counts = {}
    for name, (env, default, quick) in _COUNTS.items():
        given = getattr(args, name)
        if given is None and env in os.environ:
            given = type(default)(os.environ[env])
        counts[name] = given if given is not None else (quick if args.quick else default)
    return counts


def _run_settings(counts: dict[str, float]) -> RunSettings:
    return RunSettings(
        rounds=int(counts["rounds"]),
        requests=int(counts["requests"]),
        nodb_requests=int(counts["nodb_requests"]),
        warmup=int(counts["warmup"]),
        instances=int(counts["instances"]),
    )


def _inprocess(args: argparse.Namespace, counts: dict[str, float]) -> None:
    keys = args.contenders.split(",") if args.contenders else [x.key for x in c.ALL]
    scenario_keys = args.scenarios.split(",") if args.scenarios else None
    scenarios = [SCENARIOS_BY_KEY[k] for k in scenario_keys] if scenario_keys else list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        measurements, skipped = asyncio.run(
            run_inprocess([c.BY_KEY[k] for k in keys], scenarios, _run_settings(counts), Path(tmp))
        )
    if args.json:
        dump_measurements(measurements, skipped, describe(), args.json)
    for m in measurements:
        print(f"{m.scenario:12} {m.contender:20} {m.median:10.1f} µs")


def _rss(args: argparse.Namespace, counts: dict[str, float]) -> None:
    total = args.total or int(counts["rss_total"])
    checkpoint = args.checkpoint or int(counts["rss_checkpoint"])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = asyncio.run(
            measure_rss(Path(tmp), contender_key="ss_on", checkpoint=checkpoint, total=total)
        )
    if args.json:
        args.json.write_text(json.dumps(asdict(result)))
    print(json.dumps(asdict(result)))


def _all(args: argparse.Namespace, counts: dict[str, float]) -> None:
    settings = SuiteSettings(
        run=_run_settings(counts),
        scaling=ScalingSettings(
            rounds=int(counts["scaling_rounds"]),
            requests=int(counts["scaling_requests"]),
            instances=int(counts["instances"]),
        ),
        overhead=OverheadSettings(
            pairs=int(counts["overhead_pairs"]), requests=int(counts["overhead_requests"])
        ),
        instructions=InstructionSettings(
            short=int(counts["instruction_requests"]) // 6,
            long=int(counts["instruction_requests"]),
            seeds=int(counts["instruction_seeds"]),
        ),
        e2e=E2ESettings(
            duration=float(counts["e2e_duration"]),
            rounds=int(counts["e2e_rounds"]),
            connections=int(counts["e2e_connections"]),
            warmup=min(3.0, float(counts["e2e_duration"])),
        ),
        rss_total=int(counts["rss_total"]),
        rss_checkpoint=int(counts["rss_checkpoint"]),
        extra_python=args.extra_python,
        skip=frozenset(s for s in args.skip.split(",") if s),
        contenders=frozenset(args.contenders.split(",")) if args.contenders else None,
    )
    results = run_suite(settings)
    found = verdicts(results)
    if args.headline:
        before_after.save(results, args.label, args.headline)
    compared = None
    if args.before:
        compared = _before_after_text(before_after.load(args.before), results, args.label)
    args.output.write_text(render(results, found=found, before_after=compared))
    print(comparison_table(results))
    print()
    print(targets_table(found))
    print(f"\nwritten to {args.output}")


def _before_after_text(before: before_after.Headline, results: Results, label: str) -> str:
    return f"""## Before and after

The figures the targets judge, from an earlier run (`--before`, {before["label"]}) and from
this one ({label}), each a ratio to a contender of its own run or an instruction count, so the
machine's drift between the two runs cuts out. The targets are judged on this run. An
instruction count's change is what the earlier code's way of doing that work cost or saved per
request.

{before_after.section(before, results, label)}

"""


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    args = _parser().parse_args(argv)
    configure_production_logging()
    counts = _counts(args)
    {"all": _all, "inprocess": _inprocess, "rss": _rss}[args.command](args, counts)


if __name__ == "__main__":
    main(sys.argv[1:])
