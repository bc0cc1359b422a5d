"""fastapi-async-sqlalchemy: a pure ASGI middleware and a ``db.session`` proxy, async only."""

from __future__ import annotations

from fastapi import FastAPI

from .. import endpoints
from .base import Built, Contender, Target, built


async def build(target: Target) -> Built:
    """An app with its own middleware/proxy pair, committing on exit."""
    from fastapi_async_sqlalchemy import create_middleware_and_session_proxy  # type: ignore[import-not-found, unused-ignore]
    from sqlalchemy.ext.asyncio import create_async_engine

    middleware, db = create_middleware_and_session_proxy()
    engine = create_async_engine(target.url, **target.engine_kwargs)
    app = FastAPI()
    endpoints.add_nodb_route(app)
    for prefix in target.prefixes():
        endpoints.add_async_proxy_routes(
            app, lambda: db.session, commit_in_route=False, prefix=prefix
        )
    app.add_middleware(middleware, custom_engine=engine, commit_on_exit=True)
    return built(app, engine.dispose)


FASTAPI_ASYNC_SQLALCHEMY = Contender(
    key="fasa",
    label="fastapi-async-sqlalchemy",
    modes=frozenset({"async"}),
    build=build,
    requires=("fastapi_async_sqlalchemy",),
    note="needs Python >= 3.12 (0.8.x): measured in its own venv when one is available",
)
