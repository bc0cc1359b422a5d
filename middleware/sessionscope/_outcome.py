"""The closed vocabularies a finished session is described with (log fields and metric labels)."""

from __future__ import annotations

from typing import Final

COMMIT: Final = "commit"
ROLLBACK: Final = "rollback"
UNUSED: Final = "unused"
OUTCOMES: Final = (COMMIT, ROLLBACK, UNUSED)

# Rollback reasons besides the status classes from ``policy.rollback_reason``.
EXCEPTION: Final = "exception"
CANCELLED: Final = "cancelled"
COMMIT_ERROR: Final = "commit_error"
LATE_WRITE: Final = "late_write"
DISCONNECTED: Final = "disconnected"
"""The application was told by ``receive()`` that the client left, before its response."""
POOL_TIMEOUT: Final = "pool_timeout"
"""No pooled connection in time before the response started: the client got 503."""
ROLLBACK_REASONS: Final = (
    "status_4xx",
    "status_5xx",
    EXCEPTION,
    CANCELLED,
    COMMIT_ERROR,
    LATE_WRITE,
    DISCONNECTED,
    POOL_TIMEOUT,
)

# Phases in which a session operation can fail.
PHASE_COMMIT: Final = "commit"
PHASE_ROLLBACK: Final = "rollback"
PHASE_CLOSE: Final = "close"
PHASE_HOOK: Final = "hook"
"""An after-commit hook (``on_commit``) raised."""
PHASES: Final = (PHASE_COMMIT, PHASE_ROLLBACK, PHASE_CLOSE, PHASE_HOOK)
