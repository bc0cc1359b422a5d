"""What real ASGI servers do when the client leaves before the response: the README's Limits.

Each server runs on a loopback port; a route marks that it started, waits a second and writes;
the client closes its connection during that second. None of uvicorn, Hypercorn (h11) and
Granian cancels the application: the write is committed (the client never reads the 201).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from .support import driver_url, metadata, postgres_url

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVERS = {
    "uvicorn": [sys.executable, "-m", "uvicorn", "tests.disconnect_app:app", "--host",
                "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
    "hypercorn": [sys.executable, "-m", "hypercorn", "tests.disconnect_app:app", "--bind",
                  "127.0.0.1:{port}"],
    "granian": [str(BIN / "granian"), "--interface", "asgi", "--host", "127.0.0.1", "--port",
                "{port}", "--log-level", "warning", "tests.disconnect_app:app"],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def database(kind: str, tmp_path: Path) -> tuple[str, sa.Engine]:
    """The app's async URL and a sync engine to check rows, with fresh tables."""
    if kind == "sqlite":
        file = tmp_path / "disconnect.db"
        url, check = f"sqlite+aiosqlite:///{file}", sa.create_engine(f"sqlite:///{file}")
    else:
        base = postgres_url()
        assert base is not None
        url = driver_url(base, async_=True)
        check = sa.create_engine(driver_url(base, async_=False), poolclass=sa.NullPool)
    with check.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
    return url, check


@pytest.fixture(params=["sqlite", "pg-asyncpg"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    """The app's database URL and a sync engine to read its rows."""
    url, check = database(request.param, tmp_path)
    yield url, check
    check.dispose()


@pytest.fixture(params=sorted(SERVERS))
def server(
    request: pytest.FixtureRequest, tmp_path: Path, db: tuple[str, sa.Engine]
) -> Iterator[tuple[str, int, Path]]:
    """(name, port, marks folder) of a server running the app; stopped after the test."""
    name: str = request.param
    pytest.importorskip(name, reason=f"{name} is not installed (the dev extra has it)")
    marks = tmp_path / "marks"
    marks.mkdir()
    port = free_port()
    env = dict(
        os.environ,
        SESSIONSCOPE_DISCONNECT_DATABASE_URL=db[0],
        SESSIONSCOPE_DISCONNECT_DIR=str(marks),
    )
    command = [part.format(port=port) for part in SERVERS[name]]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.1)
        yield name, port, marks
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for(check: Callable[[], object], what: str) -> None:
    """Poll ``check`` (another process does the work) for at most 10 s."""
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_no_server_cancels_the_application_when_the_client_leaves(
    db: tuple[str, sa.Engine], server: tuple[str, int, Path]
) -> None:
    name, port, marks = server
    check = db[1]
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"POST /slow-write/left HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        wait_for((marks / "left").exists, "the route did not start")
    # the client has left; the route is still asleep, then writes and answers 201

    def rows() -> list[str]:
        with check.connect() as conn:
            return list(conn.execute(sa.text("SELECT name FROM ss_items")).scalars())

    wait_for(lambda: rows() == ["left"], f"{name}: the write of the abandoned request")
    assert rows() == ["left"]
