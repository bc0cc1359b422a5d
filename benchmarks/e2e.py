"""End to end: uvicorn (1 worker) on loopback, a real load generator, PostgreSQL.

For each contender and scenario (the sync one-row read and insert, psycopg), a server is
started, warmed up, loaded by ``wrk`` (64 connections; the asyncio/httpx client of
:mod:`benchmarks.loadgen` in a separate process when ``wrk`` is missing) for a bounded
duration, then stopped. Rounds alternate the contenders; the median round is reported.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .database import POSTGRES_URL_ENV, Urls

REPO = Path(__file__).resolve().parent.parent
CONTENDER_ENV = "BENCH_CONTENDER"
POOL_SIZE_ENV = "BENCH_POOL_SIZE"
MAX_OVERFLOW_ENV = "BENCH_MAX_OVERFLOW"
HOST = "127.0.0.1"
_POST_SCRIPT = 'wrk.method = "POST"\nwrk.headers["Content-Length"] = "0"\n'


@dataclass(frozen=True)
class E2ESettings:
    """How much load, for how long."""

    duration: float = 10.0
    warmup: float = 3.0
    connections: int = 64
    rounds: int = 1


@dataclass(frozen=True)
class LoadResult:
    """One load run."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class E2EMeasurement:
    """A contender in a scenario: every round's load result; each figure's median is shown."""

    scenario: str
    contender: str
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def median(self) -> LoadResult:
        """Requests/s, p50 and p99, each the median over the rounds; errors of all rounds."""
        return LoadResult(
            rps=statistics.median(r.rps for r in self.runs),
            p50_ms=statistics.median(r.p50_ms for r in self.runs),
            p99_ms=statistics.median(r.p99_ms for r in self.runs),
            errors=sum(r.errors for r in self.runs),
        )


SCENARIOS = {"read": ("GET", "/items/1"), "insert": ("POST", "/items")}


def load_generator() -> str:
    """``wrk`` when installed, else the Python client."""
    return "wrk" if shutil.which("wrk") else "python loadgen (httpx)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(b"GET /nodb HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def _start_server(contender: str, postgres: Urls, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    env = {**os.environ, CONTENDER_ENV: contender, POSTGRES_URL_ENV: postgres.sync}
    command = [
        sys.executable, "-m", "uvicorn", "benchmarks.server:app",
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        _wait_ready(port, process)
    except BaseException:
        _stop(process)
        raise
    return process, port


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wrk(url: str, method: str, settings: E2ESettings, duration: float) -> LoadResult:
    command = ["wrk", "-t2", f"-c{settings.connections}", f"-d{duration:g}s", "--latency"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_POST_SCRIPT if method == "POST" else "")
    try:
        output = subprocess.run(
            [*command, "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
            timeout=duration + 60,
        ).stdout
    finally:
        os.unlink(script.name)
    return parse_wrk(output)


def _to_ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> LoadResult:
    """Requests/s, p50, p99 and errors from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    latency = {p: _to_ms(v, u) for p, v, u in _PERCENTILE.findall(output)}
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", output))
    for counts in _SOCKET_ERRORS.findall(output):
        errors += sum(int(n) for n in counts)
    return LoadResult(rps=rps, p50_ms=latency["50"], p99_ms=latency["99"], errors=errors)


def _python_load(url: str, method: str, settings: E2ESettings, duration: float) -> LoadResult:
    import json

    command = [
        sys.executable, "-m", "benchmarks.loadgen", url, "--method", method,
        "--connections", str(settings.connections), "--duration", str(duration),
    ]  # fmt: skip
    output = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True, timeout=duration + 120
    ).stdout
    data = json.loads(output)
    return LoadResult(data["rps"], data["p50_ms"], data["p99_ms"], int(data["errors"]))


def _load(url: str, method: str, settings: E2ESettings, duration: float) -> LoadResult:
    if shutil.which("wrk"):
        return _wrk(url, method, settings, duration)
    return _python_load(url, method, settings, duration)


def run_e2e(
    contenders: Sequence[str], postgres: Urls, settings: E2ESettings, log: Path
) -> list[E2EMeasurement]:
    """Load each contender's server in each scenario; servers are always stopped."""
    results = {(s, c): E2EMeasurement(s, c) for s in SCENARIOS for c in contenders}
    for round_no in range(settings.rounds):
        shift = round_no % len(contenders)
        order = list(contenders[shift:]) + list(contenders[:shift])
        for contender in order:
            process, port = _start_server(contender, postgres, log)
            try:
                for scenario, (method, path) in SCENARIOS.items():
                    url = f"http://{HOST}:{port}{path}"
                    _load(url, method, settings, settings.warmup)
                    results[scenario, contender].runs.append(
                        _load(url, method, settings, settings.duration)
                    )
            finally:
                _stop(process)
    return list(results.values())
