"""The references: bare FastAPI, and the hand-written ``Depends(get_db)`` with ``yield``.

``get_db`` is the FastAPI tutorial's: the dependency opens and closes the session and the
route commits explicitly. ``scope="function"`` (FastAPI >= 0.121) ends the dependency before
the response is sent instead of after.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from .. import endpoints
from .base import Built, Contender, Target, built


def depends_supports_scope() -> bool:
    """Whether the installed FastAPI has ``Depends(..., scope=...)``."""
    return "scope" in inspect.signature(Depends).parameters


async def build_bare(target: Target) -> Built:
    """FastAPI with no session management: only ``GET /nodb``."""
    app = FastAPI()
    endpoints.add_nodb_route(app)
    return built(app)


Scope = Literal["function", "request"] | None


def _depends(dependency: Any, scope: Scope) -> Any:
    return Depends(dependency) if scope is None else Depends(dependency, scope=scope)


def _get_db_builder(scope: Scope) -> Any:
    async def build(target: Target) -> Built:
        app = FastAPI()
        endpoints.add_nodb_route(app)
        if target.mode == "sync":
            engine = create_engine(target.url, **target.engine_kwargs)
            session_local = sessionmaker(autocommit=False, autoflush=False, bind=engine)

            def get_db() -> Iterator[Session]:
                db = session_local()
                try:
                    yield db
                finally:
                    db.close()

            param: Any = Annotated[Session, _depends(get_db, scope)]
            for prefix in target.prefixes():
                endpoints.add_sync_dependency_routes(
                    app, param, commit_in_route=True, prefix=prefix
                )
            if target.hold_gate is not None:
                endpoints.add_hold_route(app, param, target.hold_gate)
            return built(app, engine.dispose)
        async_engine = create_async_engine(target.url, **target.engine_kwargs)
        async_local = async_sessionmaker(async_engine, expire_on_commit=False)

        async def get_async_db() -> AsyncIterator[AsyncSession]:
            async with async_local() as db:
                yield db

        async_param: Any = Annotated[AsyncSession, _depends(get_async_db, scope)]
        for prefix in target.prefixes():
            endpoints.add_async_dependency_routes(
                app, async_param, commit_in_route=True, prefix=prefix
            )
        if target.hold_gate is not None:
            endpoints.add_hold_route(app, async_param, target.hold_gate)
        return built(app, async_engine.dispose)

    return build


BARE = Contender(
    key="bare",
    label="bare FastAPI (no sessions)",
    modes=frozenset({"sync"}),
    build=build_bare,
    db_free=True,
)
GET_DB = Contender(
    key="get_db",
    label="Depends(get_db)",
    modes=frozenset({"sync", "async"}),
    build=_get_db_builder(None),
    note="tutorial pattern: yield dependency closes, the route commits",
    scaling=True,
)
GET_DB_AA = Contender(
    key="get_db_aa",
    label="Depends(get_db), second copy (A/A)",
    modes=frozenset({"sync", "async"}),
    build=_get_db_builder(None),
    note="the same code as Depends(get_db), built and measured as another contender: how far "
    "two identical contenders land apart in this run (the noise band)",
)
GET_DB_FUNCTION = Contender(
    key="get_db_fn",
    label='Depends(get_db, scope="function")',
    modes=frozenset({"sync", "async"}),
    build=_get_db_builder("function"),
    note="the dependency ends before the response is sent",
)
