"""Traffic for the demo app, so that every dashboard panel has data.

    python -m demo_app.load                       # 60 s, 20 requests/s, 8 at a time
    python -m demo_app.load --duration 30 --rate 50 --concurrency 16
    python -m demo_app.load --mix create=5,read=10,slow=1
    python -m demo_app.load --list-scenarios
    python -m demo_app.load --scenario leak       # hold one session 7 min: the leak alerts fire

Each request picks a scenario by weight; a progress bar runs on a terminal; at the end a
table shows, per scenario, the statuses received and the latencies. The exit status is 1 when
a request failed to connect or got a status its scenario does not expect.

``--scenario leak`` sends no mix: it holds one request session open on ``/hold`` for
``--hold-seconds`` (default 420 s), past the ``for: 5m`` of ``DbSessionLeakSuspected``, so the
alert goes pending, fires, and resolves when the request ends (or at once on Ctrl-C: the route
lets go of its session when the client disconnects). docs/alerts.md has the walk-through.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import anyio
import httpx

HOLD_DEFAULT_SECONDS = 420.0
"""``--scenario leak``: 7 minutes, past the ``for: 5m`` of ``DbSessionLeakSuspected``."""
HOLD_MAX_SECONDS = 3600.0
"""The longest the demo's ``/hold`` route accepts."""


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    """May contain ``{item}`` (a known item id) and ``{slow}`` (seconds the slow route holds)."""
    expected: frozenset[int]
    weight: int
    purpose: str
    body: str | None = None
    """``"item"`` for a new item, ``"note"`` for a note."""
    closes: bool = False
    """The server closes the connection after answering (an unhandled exception in uvicorn):
    the request asks for ``Connection: close`` so no other request is sent on that socket."""


def _s(name: str, method: str, path: str, expected: set[int], weight: int, purpose: str,
       body: str | None = None, closes: bool = False) -> Scenario:  # fmt: skip
    return Scenario(name, method, path, frozenset(expected), weight, purpose, body, closes)


SCENARIOS: tuple[Scenario, ...] = (
    _s("create", "POST", "/items", {201}, 10, "insert an item: commit", "item"),
    _s("read", "GET", "/items/{item}", {200}, 20, "read an item: commit"),
    _s("list", "GET", "/items?limit=50", {200}, 8, "list items: commit"),
    _s("note", "POST", "/items/{item}/notes", {201}, 8, "add a note: commit", "note"),
    _s("reserve", "POST", "/items/{item}/reserve?qty=3", {200, 409}, 10,
       "reserve stock: commit, or 409 after writing: rollback"),
    _s("missing", "GET", "/items/999999999", {404}, 3, "a 404: rollback, nothing written"),
    _s("boom", "POST", "/boom", {500}, 2, "write then raise: 500, rollback (exception)",
       closes=True),
    _s("commit_fail", "POST", "/notes/orphan", {500}, 2,
       "deferred foreign key fails at COMMIT: 500 (commit_error)"),
    _s("slow", "GET", "/slow?seconds={slow}", {200}, 1, "hold a session past the leak threshold"),
    _s("export", "GET", "/export", {200}, 2, "streaming CSV read after the decision"),
    _s("audit", "POST", "/items/{item}/audit", {202}, 4,
       "background task with its own session_scope: committed"),
    _s("audit_late", "POST", "/items/{item}/audit-late", {202}, 2,
       "background task through the request session: late write, rolled back"),
    _s("n_plus_one", "GET", "/items-with-notes?limit=20", {200}, 5, "1 + N statements"),
    _s("use_after_close", "POST", "/fire-and-forget", {202}, 1,
       "a detached task uses the request session after close"),
    _s("no_db", "GET", "/time", {200}, 5, "never touches the database: no session"),
)  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}
SEED_ITEMS = 20


@dataclass
class Config:
    url: str = "http://127.0.0.1:8000"
    duration: float = 60.0
    rate: float = 20.0
    """Requests per second over all workers; 0 sends as fast as ``concurrency`` allows."""
    concurrency: int = 8
    mix: dict[str, int] = field(default_factory=lambda: {s.name: s.weight for s in SCENARIOS})
    slow_seconds: float = 3.0
    timeout: float = 30.0
    seed: int | None = None
    progress: bool = False
    scenario: str = "mix"
    """``mix``: the weighted scenarios above; ``leak``: one request holding its session."""
    hold_seconds: float = HOLD_DEFAULT_SECONDS


@dataclass
class Stats:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.latencies)


@dataclass
class Summary:
    elapsed: float
    per_scenario: dict[str, Stats]

    @property
    def total(self) -> Stats:
        total = Stats()
        for stats in self.per_scenario.values():
            total.statuses.update(stats.statuses)
            total.errors.update(stats.errors)
            total.unexpected += stats.unexpected
            total.latencies.extend(stats.latencies)
        return total

    @property
    def ok(self) -> bool:
        total = self.total
        return total.unexpected == 0 and not total.errors


def parse_mix(text: str) -> dict[str, int]:
    """``"create=5,read=10"`` -> ``{"create": 5, "read": 10}`` (only known scenario names)."""
    mix: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in BY_NAME:
            raise argparse.ArgumentTypeError(
                f"unknown scenario {name!r}; known: {', '.join(BY_NAME)}"
            )
        try:
            mix[name] = int(weight) if weight else 1
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be an integer") from exc
        if mix[name] < 0:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be >= 0")
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("the mix needs at least one scenario with weight > 0")
    return mix


async def _seed(client: httpx.AsyncClient, run_id: str) -> list[int]:
    """Create a few items to read, reserve and annotate; return their ids."""
    ids: list[int] = []
    for i in range(SEED_ITEMS):
        r = await client.post("/items", json={"name": f"seed-{run_id}-{i}", "stock": 1000})
        r.raise_for_status()
        ids.append(int(r.json()["id"]))
    return ids


async def _one(
    client: httpx.AsyncClient,
    scenario: Scenario,
    config: Config,
    ids: list[int],
    rng: random.Random,
    stats: Stats,
) -> None:
    path = scenario.path.format(item=rng.choice(ids), slow=config.slow_seconds)
    body: dict[str, Any] | None = None
    if scenario.body == "item":
        body = {"name": f"load-{uuid.uuid4().hex[:12]}", "stock": rng.randint(0, 20)}
    elif scenario.body == "note":
        body = {"text": f"note {rng.randint(0, 10**6)}"}
    started = time.perf_counter()
    try:
        headers = {"connection": "close"} if scenario.closes else None
        async with client.stream(scenario.method, path, json=body, headers=headers) as response:
            await response.aread()
            status = response.status_code
    except httpx.HTTPError as exc:
        stats.errors[type(exc).__name__] += 1
        stats.latencies.append(time.perf_counter() - started)
        return
    stats.latencies.append(time.perf_counter() - started)
    stats.statuses[status] += 1
    if status not in scenario.expected:
        stats.unexpected += 1


async def run_load(
    config: Config,
    out: TextIO = sys.stderr,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Summary:
    """Send the mix to ``config.url`` (or through ``transport``) for ``config.duration`` s."""
    rng = random.Random(config.seed)
    names = [n for n, w in config.mix.items() if w > 0]
    weights = [config.mix[n] for n in names]
    per: dict[str, Stats] = {n: Stats() for n in names}
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them, so a
    # request never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=config.concurrency + 2, keepalive_expiry=2.0)
    async with httpx.AsyncClient(
        base_url=config.url, timeout=config.timeout, limits=limits, transport=transport
    ) as client:
        ids = await _seed(client, uuid.uuid4().hex[:8])
        start = time.perf_counter()
        deadline = start + config.duration
        slot = 0

        async def worker() -> None:
            nonlocal slot
            while True:
                if config.rate > 0:
                    at = start + slot / config.rate
                    slot += 1
                    if at >= deadline:
                        return
                    await anyio.sleep(max(0.0, at - time.perf_counter()))
                elif time.perf_counter() >= deadline:
                    return
                name = rng.choices(names, weights)[0]
                await _one(client, BY_NAME[name], config, ids, rng, per[name])

        async def progress() -> None:
            while True:
                _draw(out, time.perf_counter() - start, config.duration, per)
                await anyio.sleep(0.25)

        async with anyio.create_task_group() as outer:
            if config.progress:
                outer.start_soon(progress)
            async with anyio.create_task_group() as workers:
                for _ in range(config.concurrency):
                    workers.start_soon(worker)
            outer.cancel_scope.cancel()
    elapsed = time.perf_counter() - start
    if config.progress:
        _draw(out, elapsed, config.duration, per, finished=True)
        out.write("\n")
    return Summary(elapsed, per)


async def hold_session(
    config: Config,
    out: TextIO | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """``--scenario leak``: one ``GET /hold`` keeping its session open ``config.hold_seconds``.

    Says what it does on ``out`` (default stdout) with the time held so far (every second on
    a terminal, else every minute), and returns the HTTP status of the answer."""
    out = sys.stdout if out is None else out
    seconds = config.hold_seconds
    out.write(
        f"holding one request session on {config.url}/hold for {seconds:g} s. Past the leak "
        "threshold DbSessionLeakSuspected goes pending, 5 minutes later it fires; it resolves "
        "once the session closes (when this ends; Ctrl-C ends it now)\n"
    )
    out.flush()
    timeout = httpx.Timeout(config.timeout, read=seconds + config.timeout)
    started = time.perf_counter()

    async def ticker() -> None:
        every = 1.0 if config.progress else 60.0
        while True:
            await anyio.sleep(every)
            held = time.perf_counter() - started
            end = "\r" if config.progress else "\n"
            out.write(f"held {held:5.0f}/{seconds:g} s{end}")
            out.flush()

    async with (
        httpx.AsyncClient(base_url=config.url, timeout=timeout, transport=transport) as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(ticker)
        response = await client.get("/hold", params={"seconds": seconds})
        tasks.cancel_scope.cancel()
    if config.progress:
        out.write("\n")
    elapsed = time.perf_counter() - started
    out.write(f"{response.status_code} after {elapsed:.1f} s: {response.text}\n")
    out.flush()
    return response.status_code


async def run_and_report(
    config: Config,
    out: TextIO | None = None,
    progress_out: TextIO | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Summary:
    """What ``make load`` does: the load, with its progress bar on ``progress_out`` (default
    stderr) when ``config.progress``, then the summary table on ``out`` (default stdout)."""
    progress_out = sys.stderr if progress_out is None else progress_out
    out = sys.stdout if out is None else out
    summary = await run_load(config, progress_out, transport)
    out.write(format_summary(summary) + "\n")
    out.flush()
    return summary


def _draw(
    out: TextIO, elapsed: float, duration: float, per: dict[str, Stats], finished: bool = False
) -> None:
    """Redraw the bar; once ``finished`` it is full (the last request may end a little before
    the deadline, when the next one would have been due after it)."""
    width = 30
    done = 1.0 if finished or duration <= 0 else min(1.0, elapsed / duration)
    filled = int(done * width)
    total = sum(s.count for s in per.values())
    bad = sum(s.unexpected + sum(s.errors.values()) for s in per.values())
    rate = total / elapsed if elapsed > 0 else 0.0
    out.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {elapsed:5.1f}/{duration:.0f}s "
        f"{total:6d} requests {rate:6.1f}/s {bad:4d} unexpected"
    )
    out.flush()


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def format_summary(summary: Summary) -> str:
    """The final table: one row per scenario and a total row."""
    header = ("scenario", "requests", "statuses", "errors", "p50 ms", "p95 ms", "max ms")
    rows: list[tuple[str, ...]] = []
    items = sorted(summary.per_scenario.items())
    for name, stats in [*items, ("TOTAL", summary.total)]:
        lat = [v * 1000 for v in stats.latencies]
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(stats.statuses.items()))
        errors = " ".join(f"{kind}:{n}" for kind, n in sorted(stats.errors.items()))
        if stats.unexpected:
            errors = f"{errors} unexpected:{stats.unexpected}".strip()
        rows.append(
            (
                name,
                str(stats.count),
                statuses or "-",
                errors or "-",
                f"{_quantile(lat, 0.5):.1f}",
                f"{_quantile(lat, 0.95):.1f}",
                f"{max(lat, default=math.nan):.1f}",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 4 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    total = summary.total.count
    footer = (
        f"{total} requests in {summary.elapsed:.1f} s "
        f"({total / summary.elapsed if summary.elapsed else 0:.1f}/s)"
    )
    return "\n".join([line(header), rule, *map(line, rows[:-1]), rule, line(rows[-1]), footer])


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--url", default=Config.url, help="the demo app (default %(default)s)")
    parser.add_argument("--duration", type=float, default=Config.duration, help="seconds")
    parser.add_argument(
        "--rate", type=float, default=Config.rate, help="requests/s in total; 0: no limit"
    )
    parser.add_argument("--concurrency", type=int, default=Config.concurrency)
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=None,
        help="scenario weights, e.g. create=5,read=10,slow=1 (replaces the default mix)",
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=Config.slow_seconds,
        help="how long /slow holds its session (default %(default)s; above the leak threshold)",
    )
    parser.add_argument("--timeout", type=float, default=Config.timeout, help="per request, s")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the mix")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw a progress bar (default: when stderr is a terminal)",
    )
    parser.add_argument("--list-scenarios", action="store_true", help="list scenarios and exit")
    parser.add_argument(
        "--scenario",
        choices=("mix", "leak"),
        default="mix",
        help="mix: the weighted scenarios (default); leak: hold one session on /hold for "
        "--hold-seconds, so the leak alerts go pending, fire and resolve",
    )
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=HOLD_DEFAULT_SECONDS,
        help=f"--scenario leak: how long the session is held (default %(default)g s; "
        f"at most {HOLD_MAX_SECONDS:g})",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not 0 < args.hold_seconds <= HOLD_MAX_SECONDS:
        parser.error(f"--hold-seconds must be above 0 and at most {HOLD_MAX_SECONDS:g}")
    config = Config(
        url=args.url,
        duration=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        slow_seconds=args.slow_seconds,
        timeout=args.timeout,
        seed=args.seed,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        scenario=args.scenario,
        hold_seconds=args.hold_seconds,
    )
    if args.mix is not None:
        config.mix = args.mix
    return config, args.list_scenarios


def main(argv: Sequence[str] | None = None) -> int:
    config, list_only = parse_args(argv)
    if list_only:
        for s in SCENARIOS:
            print(f"{s.name:16} {s.weight:3}  {s.method:4} {s.path:32} {s.purpose}")
        return 0
    try:
        if config.scenario == "leak":
            try:
                return 0 if anyio.run(hold_session, config) == 200 else 1
            except KeyboardInterrupt:
                print("\ninterrupted: the demo lets go of the session now", file=sys.stderr)
                return 130
        summary = anyio.run(run_and_report, config)
    except httpx.HTTPError as exc:
        print(f"cannot reach the demo app at {config.url}: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
