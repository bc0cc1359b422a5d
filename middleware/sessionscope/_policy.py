"""Which final statuses commit, and how a rollback is classified."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

CommitPolicy = Callable[[int], bool]
"""A function of the final HTTP status: ``True`` commits the request's transaction."""


def commit_below_400(status: int) -> bool:
    """The default policy: 1xx, 2xx and 3xx commit; 4xx and 5xx roll back."""
    return status < 400


_STATUS_REASONS: Final = {n: f"status_{n}xx" for n in range(1, 6)}


def rollback_reason(status: int) -> str:
    """The reason recorded when ``status`` rolls back: ``status_4xx``, ``status_5xx``, ...

    Bounded to five values so it can be a metric label.
    """
    return _STATUS_REASONS.get(status // 100, "status_5xx")
