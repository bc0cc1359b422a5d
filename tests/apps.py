"""FastAPI test apps with the same routes for sync and async sessions."""

from __future__ import annotations

from typing import Any

from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from sessionscope import DBSessionMiddleware, session_scope
from sessionscope.fastapi import AsyncDBSession, DBSession

from .support import Backend, items


def items_app(backend: Backend, **options: Any) -> FastAPI:
    """Routes that write then answer 201, 409 (raised), 400 (returned) or raise."""
    app = FastAPI()
    options.setdefault("registry", CollectorRegistry())
    app.add_middleware(DBSessionMiddleware, engine=backend.engine, **options)
    if backend.is_async:
        _async_routes(app, backend)
    else:
        _sync_routes(app, backend)
    return app


def _sync_routes(app: FastAPI, backend: Backend) -> None:
    @app.post("/items/{name}", status_code=201)
    def create(name: str, db: DBSession, request: Request) -> dict[str, Any]:
        assert db is request.state.db
        db.execute(items.insert().values(name=name))
        return {"name": name}

    @app.post("/conflict/{name}")
    def conflict(name: str, db: DBSession) -> None:
        db.execute(items.insert().values(name=name))
        raise HTTPException(409, "conflict")

    @app.post("/returned-400/{name}")
    def returned(name: str, db: DBSession) -> JSONResponse:
        db.execute(items.insert().values(name=name))
        return JSONResponse({"error": "bad"}, status_code=400)

    @app.post("/boom/{name}")
    def boom(name: str, db: DBSession) -> None:
        db.execute(items.insert().values(name=name))
        raise RuntimeError("secret internal detail")

    @app.post("/background/{name}", status_code=202)
    def background(name: str, db: DBSession, tasks: BackgroundTasks) -> dict[str, str]:
        def committed_work() -> None:
            with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                session.execute(items.insert().values(name=f"{name}-own-session"))

        def late_write() -> None:
            db.execute(items.insert().values(name=f"{name}-late"))

        tasks.add_task(committed_work)
        tasks.add_task(late_write)
        return {"name": name}

    @app.get("/no-db")
    def no_db() -> dict[str, str]:
        return {"db": "untouched"}


def _async_routes(app: FastAPI, backend: Backend) -> None:
    @app.post("/items/{name}", status_code=201)
    async def create(name: str, db: AsyncDBSession, request: Request) -> dict[str, Any]:
        assert db is request.state.db
        await db.execute(items.insert().values(name=name))
        return {"name": name}

    @app.post("/conflict/{name}")
    async def conflict(name: str, db: AsyncDBSession) -> None:
        await db.execute(items.insert().values(name=name))
        raise HTTPException(409, "conflict")

    @app.post("/returned-400/{name}")
    async def returned(name: str, db: AsyncDBSession) -> JSONResponse:
        await db.execute(items.insert().values(name=name))
        return JSONResponse({"error": "bad"}, status_code=400)

    @app.post("/boom/{name}")
    async def boom(name: str, db: AsyncDBSession) -> None:
        await db.execute(items.insert().values(name=name))
        raise RuntimeError("secret internal detail")

    @app.post("/background/{name}", status_code=202)
    async def background(name: str, db: AsyncDBSession, tasks: BackgroundTasks) -> dict[str, str]:
        async def committed_work() -> None:
            async with session_scope(backend.engine) as session:  # type: ignore[arg-type]
                await session.execute(items.insert().values(name=f"{name}-own-session"))

        async def late_write() -> None:
            await db.execute(items.insert().values(name=f"{name}-late"))

        tasks.add_task(committed_work)
        tasks.add_task(late_write)
        return {"name": name}

    @app.get("/no-db")
    async def no_db() -> dict[str, str]:
        return {"db": "untouched"}
