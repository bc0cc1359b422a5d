"""The private reads of :mod:`sessionscope._compat`: each on the installed library (the real
path) and on an object without the attribute (what an upgrade that drops it looks like)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.pool import QueuePool

from sessionscope import _compat
from sessionscope._metrics import Metrics
from sessionscope._pool import instrument_pool


def test_max_overflow_is_read_from_a_queue_pool(tmp_path: Path) -> None:
    for configured in (3, 0, -1):
        engine = sa.create_engine(
            f"sqlite:///{tmp_path / 'compat.db'}", pool_size=2, max_overflow=configured
        )
        try:
            assert isinstance(engine.pool, QueuePool)
            assert _compat.max_overflow(engine.pool) == configured
        finally:
            engine.dispose()


def test_max_overflow_of_a_pool_without_it_is_unknown() -> None:
    class Renamed:
        max_overflow_setting = 10

    class OtherShape:
        _max_overflow = "10"

    class Flag:
        _max_overflow = True

    for pool in (Renamed(), OtherShape(), Flag(), None):
        assert _compat.max_overflow(pool) is None


def test_without_max_overflow_the_max_connections_gauge_is_missing_and_the_rest_is_exported(
    tmp_path: Path,
) -> None:
    # What an upgrade that renames QueuePool._max_overflow would do: a pool without it.
    class PoolWithoutMaxOverflow(QueuePool):
        def __getattribute__(self, name: str) -> Any:
            if name == "_max_overflow" and _asked_from_compat():
                raise AttributeError(name)
            return super().__getattribute__(name)

    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'compat.db'}", poolclass=PoolWithoutMaxOverflow, pool_size=2
    )
    registry = CollectorRegistry()
    try:
        instrument_pool(engine, Metrics.on(registry), "main")
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
            used = registry.get_sample_value("db_pool_connections", {"db": "main", "state": "used"})
        assert used == 1
        assert registry.get_sample_value("db_pool_connections_max", {"db": "main"}) is None
        assert registry.get_sample_value("db_pool_timeout_seconds", {"db": "main"}) == 30
    finally:
        engine.dispose()


def _asked_from_compat() -> bool:
    """Whether sessionscope._compat (not SQLAlchemy's own pool code) is reading the attribute."""
    import sys

    frame = sys._getframe(2)
    return frame.f_code.co_filename == _compat.__file__
