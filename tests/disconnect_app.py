"""The app the real-server disconnect test serves (not a test module).

``POST /slow-write/{name}`` marks that it started (a file in SESSIONSCOPE_DISCONNECT_DIR), waits
a second, writes a row and answers ``201``: the client leaves during that second. The database
URL (an async driver) comes from SESSIONSCOPE_DISCONNECT_DATABASE_URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from sessionscope import DBSessionMiddleware

from .support import items

engine = create_async_engine(os.environ["SESSIONSCOPE_DISCONNECT_DATABASE_URL"])
marks = Path(os.environ["SESSIONSCOPE_DISCONNECT_DIR"])


async def slow_write(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    (marks / name).touch()
    await anyio.sleep(1.0)  # the client leaves meanwhile
    await request.state.db.execute(items.insert().values(name=name))
    return JSONResponse({}, status_code=201)


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/slow-write/{name}", slow_write, methods=["POST"]),
        Route("/health", health),
    ]
)
app.add_middleware(DBSessionMiddleware, engine=engine, exclude_paths=("/health",), metrics=False)
