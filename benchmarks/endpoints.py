"""The endpoints every contender serves, written once for each way a route gets its session.

A contender either injects the session as a route parameter (an ``Annotated[..., Depends()]``
type), exposes it through a proxy the route reads (``db.session``), or leaves it in the
request's state (``request.state.db``). ``commit_in_route`` is the hand-written pattern's
explicit ``commit()``; session managers commit by themselves.

Paths: ``GET /nodb`` (no database), ``GET /items/{item_id}`` (one-row read), ``POST /items``
(one-row insert, 201) and ``POST /items/conflict`` (one-row insert, then 409). A ``prefix``
makes a copy of the read route only (``/r7/items/{item_id}``), for the many-routes measurement.
``GET /hold`` opens the request session and waits at a :class:`HoldGate`, to keep many sessions
open at once.
"""

# No ``from __future__ import annotations``: FastAPI reads these closures' annotations.

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .database import items

NODB_PATH = "/nodb"
READ_PATH = "/items/{item_id}"
INSERT_PATH = "/items"
CONFLICT_PATH = "/items/conflict"
HOLD_PATH = "/hold"

_READ = select(items.c.id, items.c.name)
_INSERT = insert(items).values(name="inserted")


def _row(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name}


def add_nodb_route(app: FastAPI) -> None:
    """``GET /nodb``: a route that never touches the database."""

    @app.get(NODB_PATH)
    async def nodb() -> dict[str, bool]:
        return {"ok": True}


def add_sync_dependency_routes(
    app: FastAPI, session_param: Any, *, commit_in_route: bool, prefix: str = ""
) -> None:
    """Sync (threadpool) routes that receive a ``Session`` through ``session_param``."""

    @app.get(prefix + READ_PATH)
    def read_item(item_id: int, db: session_param) -> dict[str, Any]:
        return _row(db.execute(_READ.where(items.c.id == item_id)).one())

    if prefix:
        return

    @app.post(prefix + INSERT_PATH, status_code=201)
    def insert_item(db: session_param) -> dict[str, bool]:
        db.execute(_INSERT)
        if commit_in_route:
            db.commit()
        return {"ok": True}

    @app.post(prefix + CONFLICT_PATH, status_code=201)
    def insert_conflict(db: session_param) -> dict[str, bool]:
        db.execute(_INSERT)
        raise HTTPException(status_code=409, detail="conflict")


def add_sync_proxy_routes(
    app: FastAPI, session: Callable[[], Session], *, commit_in_route: bool, prefix: str = ""
) -> None:
    """Sync (threadpool) routes that read their ``Session`` from a proxy (``db.session``)."""

    @app.get(prefix + READ_PATH)
    def read_item(item_id: int) -> dict[str, Any]:
        return _row(session().execute(_READ.where(items.c.id == item_id)).one())

    if prefix:
        return

    @app.post(prefix + INSERT_PATH, status_code=201)
    def insert_item() -> dict[str, bool]:
        db = session()
        db.execute(_INSERT)
        if commit_in_route:
            db.commit()
        return {"ok": True}

    @app.post(prefix + CONFLICT_PATH, status_code=201)
    def insert_conflict() -> dict[str, bool]:
        session().execute(_INSERT)
        raise HTTPException(status_code=409, detail="conflict")


def add_async_dependency_routes(
    app: FastAPI, session_param: Any, *, commit_in_route: bool, prefix: str = ""
) -> None:
    """Async routes that receive an ``AsyncSession`` through ``session_param``."""

    @app.get(prefix + READ_PATH)
    async def read_item(item_id: int, db: session_param) -> dict[str, Any]:
        return _row((await db.execute(_READ.where(items.c.id == item_id))).one())

    if prefix:
        return

    @app.post(prefix + INSERT_PATH, status_code=201)
    async def insert_item(db: session_param) -> dict[str, bool]:
        await db.execute(_INSERT)
        if commit_in_route:
            await db.commit()
        return {"ok": True}

    @app.post(prefix + CONFLICT_PATH, status_code=201)
    async def insert_conflict(db: session_param) -> dict[str, bool]:
        await db.execute(_INSERT)
        raise HTTPException(status_code=409, detail="conflict")


def add_async_proxy_routes(
    app: FastAPI,
    session: Callable[[], AsyncSession],
    *,
    commit_in_route: bool,
    prefix: str = "",
) -> None:
    """Async routes that read their ``AsyncSession`` from a proxy (``db.session``)."""

    @app.get(prefix + READ_PATH)
    async def read_item(item_id: int) -> dict[str, Any]:
        return _row((await session().execute(_READ.where(items.c.id == item_id))).one())

    if prefix:
        return

    @app.post(prefix + INSERT_PATH, status_code=201)
    async def insert_item() -> dict[str, bool]:
        db = session()
        await db.execute(_INSERT)
        if commit_in_route:
            await db.commit()
        return {"ok": True}

    @app.post(prefix + CONFLICT_PATH, status_code=201)
    async def insert_conflict() -> dict[str, bool]:
        await session().execute(_INSERT)
        raise HTTPException(status_code=409, detail="conflict")


def add_state_routes(app: FastAPI, mode: str, state_key: str = "db") -> None:
    """Routes that read the request session from ``request.state.<state_key>`` (sessionscope
    without its ``DBSession`` dependency): sync (threadpool) or async, as ``mode`` says."""
    if mode == "sync":

        @app.get(READ_PATH)
        def read_item(item_id: int, request: Request) -> dict[str, Any]:
            db: Session = getattr(request.state, state_key)
            return _row(db.execute(_READ.where(items.c.id == item_id)).one())

        @app.post(INSERT_PATH, status_code=201)
        def insert_item(request: Request) -> dict[str, bool]:
            getattr(request.state, state_key).execute(_INSERT)
            return {"ok": True}

        @app.post(CONFLICT_PATH, status_code=201)
        def insert_conflict(request: Request) -> dict[str, bool]:
            getattr(request.state, state_key).execute(_INSERT)
            raise HTTPException(status_code=409, detail="conflict")

        return

    @app.get(READ_PATH)
    async def aread_item(item_id: int, request: Request) -> dict[str, Any]:
        db: AsyncSession = getattr(request.state, state_key)
        return _row((await db.execute(_READ.where(items.c.id == item_id))).one())

    @app.post(INSERT_PATH, status_code=201)
    async def ainsert_item(request: Request) -> dict[str, bool]:
        await getattr(request.state, state_key).execute(_INSERT)
        return {"ok": True}

    @app.post(CONFLICT_PATH, status_code=201)
    async def ainsert_conflict(request: Request) -> dict[str, bool]:
        await getattr(request.state, state_key).execute(_INSERT)
        raise HTTPException(status_code=409, detail="conflict")


class HoldGate:
    """Where ``GET /hold`` requests wait, with their session open, until released."""

    def __init__(self) -> None:
        self.waiting = 0
        self._release = asyncio.Event()
        self._enough = asyncio.Event()
        self._wanted = 0

    async def until_waiting(self, count: int) -> None:
        """Return once ``count`` requests are waiting."""
        self._wanted = count
        if self.waiting < count:
            self._enough.clear()
            await self._enough.wait()

    async def hold(self) -> None:
        """Wait until :meth:`release`."""
        self.waiting += 1
        if self._wanted and self.waiting >= self._wanted:
            self._enough.set()
        try:
            await self._release.wait()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        """Let every waiting request finish; later ones pass straight through."""
        self._release.set()


def add_hold_route(app: FastAPI, session_param: Any, gate: HoldGate) -> None:
    """``GET /hold``: receives the request session, then waits at ``gate``."""

    @app.get(HOLD_PATH)
    async def hold(db: session_param) -> dict[str, bool]:
        await gate.hold()
        return {"ok": db is not None}
