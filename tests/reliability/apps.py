"""Small Starlette applications the reliability tests drive, sync and async alike.

Each is wrapped the way users wrap theirs: ``Starlette(middleware=[DBSessionMiddleware])``,
so Starlette's ``ServerErrorMiddleware`` sits outside and turns an application error into a
``500`` the client sees.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sessionscope import DBSessionMiddleware

from ..support import items

REJECT_PREFIX = "reject-"
"""Markers starting with this are written, then answered ``409`` (so rolled back)."""


def write_app(
    engine: Engine | AsyncEngine,
    *,
    hold: float = 0.0,
    registry: CollectorRegistry | None = None,
    **middleware_kw: Any,
) -> Starlette:
    """``POST /write/{marker}``: insert the marker, hold the transaction ``hold`` seconds
    (``pg_sleep``, so the connection is busy on the server; ``?hold=`` overrides), answer 201
    (409 for rejects)."""
    sleep = sa.text("select pg_sleep(:s)")

    def status_for(marker: str) -> int:
        return 409 if marker.startswith(REJECT_PREFIX) else 201

    def hold_for(request: Request) -> float:
        return float(request.query_params.get("hold", hold))

    async def write_async(request: Request) -> Response:
        marker = request.path_params["marker"]
        session: AsyncSession = request.state.db
        await session.execute(items.insert().values(name=marker))
        if seconds := hold_for(request):
            await session.execute(sleep, {"s": seconds})
        return JSONResponse({"marker": marker}, status_code=status_for(marker))

    def write_sync(request: Request) -> Response:
        marker = request.path_params["marker"]
        session: Session = request.state.db
        session.execute(items.insert().values(name=marker))
        if seconds := hold_for(request):
            session.execute(sleep, {"s": seconds})
        return JSONResponse({"marker": marker}, status_code=status_for(marker))

    endpoint = write_async if isinstance(engine, AsyncEngine) else write_sync
    return Starlette(
        routes=[Route("/write/{marker}", endpoint, methods=["POST"])],
        middleware=[
            Middleware(
                DBSessionMiddleware,
                engine=engine,
                registry=registry or CollectorRegistry(),
                **middleware_kw,
            )
        ],
    )
