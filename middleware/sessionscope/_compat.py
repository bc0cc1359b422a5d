"""The one thing sessionscope reads from another library that has no public way to read it.

Each entry reads one private attribute, checks what it got, and returns ``None`` when the
attribute is missing or of another shape, so an upgrade that changes it loses the feature
built on it (a metric is not exported) and never fails a request or a scrape. Each entry has a
test that runs both the real path and the fallback.
"""

from __future__ import annotations

from typing import Any


def max_overflow(pool: Any) -> int | None:
    """``max_overflow`` of a ``QueuePool`` (``-1``: no limit), else ``None``.

    SQLAlchemy answers ``size()``, ``overflow()``, ``checkedout()`` and ``checkedin()``
    publicly, but keeps the configured ``max_overflow`` in ``_max_overflow`` only. Without it,
    the ``pool_connections_max`` gauge is not exported.
    """
    value = getattr(pool, "_max_overflow", None)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
