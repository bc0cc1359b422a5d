"""Metrics under prometheus_client's multiprocess mode, with two real uvicorn workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from .support import metadata

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[str]:
    """uvicorn with 2 workers on a loopback port, stopped after the test."""
    database = tmp_path / "mp.db"
    setup = sa.create_engine(f"sqlite:///{database}")
    metadata.create_all(setup)
    setup.dispose()
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    port = free_port()
    env = dict(
        os.environ,
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
        SESSIONSCOPE_MP_DATABASE_URL=f"sqlite:///{database}",
    )
    command = [sys.executable, "-m", "uvicorn", "tests.multiprocess_app:app", "--workers", "2"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/metrics", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, "uvicorn exited"
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_two_workers_report_one_merged_set_of_session_metrics(two_workers: str) -> None:
    pids: set[int] = set()
    sent = 0
    while sent < 40 or (len(pids) < 2 and sent < 400):
        # a new connection per request lets the kernel hand requests to either worker
        with httpx.Client(base_url=two_workers, timeout=10) as client:
            response = client.post(f"/items/n{sent}")
        assert response.status_code == 201
        pids.add(response.json()["pid"])
        sent += 1
    assert len(pids) == 2, "both workers should have served requests"
    text = httpx.get(f"{two_workers}/metrics", timeout=10).text

    closed = samples(text, "db_sessions_closed_total")
    key: Any = (("db", "default"), ("outcome", "commit"), ("route", "/items/{name}"))
    assert closed[key] == sent
    open_sessions = samples(text, "db_sessions_open")
    assert sum(open_sessions.values()) == 0
    assert all("pid" not in dict(k) for k in open_sessions)  # livesum: one merged series
    used = samples(text, "db_pool_connections")
    assert used[(("db", "default"), ("state", "used"))] == 0
    assert samples(text, "db_leak_threshold_seconds") == {(("db", "default"),): 60.0}
    statements = samples(text, "db_statements_total")
    assert statements[(("db", "default"), ("route", "/items/{name}"))] == sent
