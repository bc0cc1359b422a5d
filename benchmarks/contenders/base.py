"""What a contender is: a way to build the benchmark app, sync or async, on given URLs."""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from starlette.types import ASGIApp

from ..database import Urls
from ..endpoints import HoldGate

Mode = Literal["sync", "async"]


@dataclass(frozen=True)
class Target:
    """What to build: the mode, the database, the engine options and the extra routes."""

    mode: Mode
    urls: Urls
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Pool options for every engine (``pool_size``, ``max_overflow``) in end-to-end runs."""
    route_copies: int = 1
    """How many copies of the item routes (``/r<i>/items/...``) to register."""
    hold_gate: HoldGate | None = None
    """When set, register ``GET /hold`` waiting at this gate (baseline and sessionscope)."""

    def prefixes(self) -> list[str]:
        """The route prefixes: ``""`` and then ``/r1`` ... for the copies."""
        return ["" if i == 0 else f"/r{i}" for i in range(self.route_copies)]

    @property
    def url(self) -> str:
        """The URL for this mode's driver."""
        return self.urls.sync if self.mode == "sync" else self.urls.async_


@dataclass
class Built:
    """A built app and how to release what it holds (engines)."""

    app: ASGIApp
    close: Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def built(app: FastAPI, *closers: Callable[[], Any]) -> Built:
    """A :class:`Built` whose ``close`` awaits or calls each closer (engine disposal)."""

    async def close() -> None:
        for closer in closers:
            result = closer()
            if isinstance(result, Awaitable):
                await result

    return Built(app=app, close=close if closers else _nothing)


@dataclass(frozen=True)
class Contender:
    """One way of managing request sessions, and the apps it builds."""

    key: str
    label: str
    modes: frozenset[Mode]
    build: Callable[[Target], Awaitable[Built]]
    requires: tuple[str, ...] = ()
    """Importable modules it needs (peers live in the benchmark venv only)."""
    note: str = ""
    scaling: bool = False
    """Whether it takes part in the scaling measurements (serves ``GET /hold``)."""
    db_free: bool = False
    """Serves only ``GET /nodb`` (bare FastAPI)."""

    def missing(self) -> str | None:
        """Why it cannot run in this interpreter, or ``None`` when it can."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(absent)}" if absent else None
