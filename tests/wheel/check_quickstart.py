"""Serve the README's quick start under real uvicorn and check it as a user would; exit 1 on any
failure.

Run by the ``wheel`` nox session with the Python of a venv that holds ``sessionscope[fastapi]``
installed from the built wheel, and uvicorn, nothing else. It copies the README's quick start
(the block after ``<!-- quickstart -->``) into ``app.py`` in an empty folder, as a user would,
starts ``uvicorn app:app`` there on 127.0.0.1 (a free port), drives it with urllib and checks:

- ``sessionscope`` is found in site-packages (the wheel), not in the source tree;
- ``POST /items?name=teapot`` answers 201 and its row is in the database (a commit);
- ``POST /items?name=draft-kettle`` answers 422 and its row is not (a rollback);
- ``/metrics/`` counts one committed and one rolled-back session on ``/items``;
- nothing is printed while requests are served (access log off, as in production): the
  library writes no line per request unless the application configures logging to.

Standard library only, so that it needs nothing the user would not install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
QUICKSTART = re.compile(r"<!-- quickstart -->\n```python\n(.*?)\n```", re.S)
STARTED = "Uvicorn running on"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """uvicorn in a child process; every line it prints is kept, in order."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
            ],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if STARTED in line:
                self.started.set()
        self.started.set()  # the process ended: stop waiting

    def wait_started(self) -> None:
        self.started.wait(START_TIMEOUT)
        if self.process.poll() is not None or not any(STARTED in line for line in self.lines):
            raise SystemExit("uvicorn did not start:\n" + "\n".join(self.lines))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(5)


def request(method: str, url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric_samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of ``name`` in a Prometheus text exposition, by their label set."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        frozenset(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def main() -> int:
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok:   " if ok else "FAIL: ") + what)
        if not ok:
            failures.append(what)

    spec = importlib.util.find_spec("sessionscope")  # found, not imported
    origin = spec.origin if spec else None
    check(
        origin is not None and "site-packages" in origin,
        f"sessionscope is the installed package, not the source tree (found {origin})",
    )

    quickstart = QUICKSTART.search(README.read_text())
    if quickstart is None:
        raise SystemExit(f"no <!-- quickstart --> block in {README}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "app.py").write_text(quickstart.group(1) + "\n")
        database = Path(tmp) / "app.db"  # the quick start's sqlite:///app.db
        server = Server(Path(tmp))
        try:
            server.wait_started()
            quiet_from = len(server.lines)

            status, body = request("POST", server.url("/items?name=teapot"))
            check(status == 201, f"POST /items answers 201 (got {status}: {body[:200]!r})")
            check(
                status == 201 and json.loads(body) == {"id": 1},
                f"POST /items returns the new id (got {body[:200]!r})",
            )
            status, body = request("POST", server.url("/items?name=draft-kettle"))
            check(
                status == 422, f"POST /items for a draft answers 422 (got {status}: {body[:200]!r})"
            )
            status, metrics = request("GET", server.url("/metrics/"))
            check(status == 200, f"GET /metrics/ answers 200 (got {status})")
            time.sleep(0.5)  # let any line the requests caused arrive
            per_request_output = server.lines[quiet_from:]
        finally:
            server.stop()

        rows = sqlite3.connect(database).execute("select name from items order by id").fetchall()
        check(rows == [("teapot",)], f"the database holds the committed row only (got {rows})")

        closed = metric_samples(metrics.decode(), "db_sessions_closed_total")

        def count(route: str, outcome: str) -> float:
            labels = {("db", "default"), ("route", route), ("outcome", outcome)}
            return closed.get(frozenset(labels), 0.0)

        check(count("/items", "commit") == 1, "db_sessions_closed_total counts 1 commit on /items")
        check(
            count("/items", "rollback") == 1,
            "db_sessions_closed_total counts 1 rollback on /items",
        )
        rollbacks = metric_samples(metrics.decode(), "db_session_rollbacks_total")
        check(
            rollbacks.get(frozenset({("db", "default"), ("reason", "status_4xx")})) == 1,
            "db_session_rollbacks_total counts 1 rollback for reason status_4xx",
        )
        printed = "".join(f"\n    {line}" for line in per_request_output)
        check(
            per_request_output == [],
            "nothing is printed while requests are served"
            + (f"; printed:{printed}" * bool(printed)),
        )

    print("\nuvicorn printed:\n    " + "\n    ".join(server.lines))
    if failures:
        print(f"\n{len(failures)} check(s) failed")
        return 1
    print("\nevery check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
