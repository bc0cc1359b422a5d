"""FastAPI-SQLAlchemy (``fastapi_sqlalchemy``): a ``BaseHTTPMiddleware`` and a ``db.session`` proxy.

Sync sessions only, one session factory per process (a module global). With
``commit_on_exit=True`` it commits when the request ends, on the event loop, whatever the
status: the 409 scenario's write is committed, not rolled back.
"""

from __future__ import annotations

from fastapi import FastAPI

from .. import endpoints
from .base import Built, Contender, Target, built


async def build(target: Target) -> Built:
    """An app with FastAPI-SQLAlchemy's middleware, committing on exit."""
    from fastapi_sqlalchemy import DBSessionMiddleware, db  # type: ignore[import-not-found, unused-ignore]
    from sqlalchemy import create_engine

    engine = create_engine(target.url, **target.engine_kwargs)
    app = FastAPI()
    endpoints.add_nodb_route(app)
    for prefix in target.prefixes():
        endpoints.add_sync_proxy_routes(
            app, lambda: db.session, commit_in_route=False, prefix=prefix
        )
    app.add_middleware(DBSessionMiddleware, custom_engine=engine, commit_on_exit=True)
    return built(app, engine.dispose)


FASTAPI_SQLALCHEMY = Contender(
    key="fastapi_sqlalchemy",
    label="FastAPI-SQLAlchemy",
    modes=frozenset({"sync"}),
    build=build,
    requires=("fastapi_sqlalchemy",),
    note="commits after the response and whatever the status (the 409 write is committed)",
)
