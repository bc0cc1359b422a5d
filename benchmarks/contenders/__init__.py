"""Every contender, in the order of the results table."""

from __future__ import annotations

from .base import Built, Contender, Mode, Target
from .baseline import BARE, GET_DB, GET_DB_AA, GET_DB_FUNCTION, depends_supports_scope
from .peer_advanced_alchemy import ADVANCED_ALCHEMY
from .peer_fastapi_async_sqlalchemy import FASTAPI_ASYNC_SQLALCHEMY
from .peer_fastapi_sqla import FASTAPI_SQLA
from .peer_fastapi_sqlalchemy import FASTAPI_SQLALCHEMY
from .sessionscope_app import (
    SESSIONSCOPE_OFF,
    SESSIONSCOPE_ON,
    SESSIONSCOPE_STATE,
    off_supported,
)

ALL: tuple[Contender, ...] = (
    BARE,
    GET_DB,
    GET_DB_AA,
    GET_DB_FUNCTION,
    SESSIONSCOPE_ON,
    SESSIONSCOPE_OFF,
    SESSIONSCOPE_STATE,
    FASTAPI_SQLA,
    FASTAPI_SQLALCHEMY,
    FASTAPI_ASYNC_SQLALCHEMY,
    ADVANCED_ALCHEMY,
)
PEERS: frozenset[str] = frozenset(
    c.key for c in (FASTAPI_SQLA, FASTAPI_SQLALCHEMY, FASTAPI_ASYNC_SQLALCHEMY, ADVANCED_ALCHEMY)
)
BY_KEY: dict[str, Contender] = {c.key: c for c in ALL}


def unavailable(contender: Contender) -> str | None:
    """Why ``contender`` cannot run here, or ``None``."""
    if contender.key == GET_DB_FUNCTION.key and not depends_supports_scope():
        return "this FastAPI has no Depends(scope=...)"
    return contender.missing()


__all__ = [
    "ALL",
    "BY_KEY",
    "PEERS",
    "Built",
    "Contender",
    "Mode",
    "Target",
    "off_supported",
    "unavailable",
]
