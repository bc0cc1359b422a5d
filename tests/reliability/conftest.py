"""Fixtures of the reliability suite: the PostgreSQL server, fresh tables, the fault proxy."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from ..support import driver_url, metadata, postgres_url
from .fault_proxy import FaultProxy
from .helpers import SCHEMA


@pytest.fixture
def pg_url() -> str:
    """The plain ``postgresql://`` URL of the test server (skips without one)."""
    url = postgres_url()
    assert url is not None
    return url


@pytest.fixture
def check(pg_url: str) -> Iterator[Engine]:
    """A direct engine (no proxy) on freshly created tables, for reading behind the app's back."""
    engine = sa.create_engine(
        driver_url(pg_url, async_=False),
        poolclass=sa.NullPool,
        connect_args={"options": f"-c search_path={SCHEMA}"},
    )
    with engine.begin() as conn:
        conn.execute(sa.text(f"create schema if not exists {SCHEMA}"))
    with engine.begin() as conn:
        # fail fast instead of hanging if a transaction somewhere still holds the tables
        conn.execute(sa.text("set local lock_timeout = '20s'"))
        metadata.drop_all(conn)
        metadata.create_all(conn)
    yield engine
    engine.dispose()


@pytest.fixture
def app_name() -> str:
    """A unique ``application_name`` for this test's connections (pg_stat_activity filter)."""
    return f"ss-rel-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def proxy(pg_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test server, on 127.0.0.1; stopped after the test."""
    url = make_url(pg_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running
