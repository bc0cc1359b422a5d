"""fastapi-sqla: a pure ASGI middleware that opens a session for every request.

It is configured from environment variables (``sqlalchemy_url`` for the default key,
``fastapi_sqla__<key>__sqlalchemy_url`` for others), which this module sets before calling the
library's own ``startup``. Sessions commit below 400 before the response starts.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from .. import endpoints
from .base import Built, Contender, Target, built

_counter = 0


def _configure(key: str, target: Target) -> None:
    prefix = "sqlalchemy_" if key == "default" else f"fastapi_sqla__{key}__sqlalchemy_"
    os.environ[f"{prefix}url"] = target.url
    for name, value in target.engine_kwargs.items():
        os.environ[f"{prefix}{name}"] = str(value)


async def build(target: Target) -> Built:
    """An app with fastapi-sqla's sync or async middleware and dependency."""
    global _counter
    from fastapi_sqla import sqla  # type: ignore[import-not-found, unused-ignore]

    app = FastAPI()
    endpoints.add_nodb_route(app)
    if target.mode == "sync":
        _counter += 1
        key = "default" if _counter == 1 else f"bench{_counter}"
        _configure(key, target)
        sqla.startup(key=key)
        param: Any = Annotated[sqla.SqlaSession, Depends(sqla.SessionDependency(key=key))]
        for prefix in target.prefixes():
            endpoints.add_sync_dependency_routes(app, param, commit_in_route=False, prefix=prefix)
        app.add_middleware(sqla.SessionMiddleware, key=key)
        factory = sqla._session_factories[key]
        return built(app, lambda: factory.kw["bind"].dispose())
    from fastapi_sqla import async_sqla  # type: ignore[import-not-found, unused-ignore]

    _counter += 1
    key = f"bench_async{_counter}"
    _configure(key, target)
    await async_sqla.startup(key=key)
    async_param: Any = Annotated[
        async_sqla.SqlaAsyncSession, Depends(async_sqla.AsyncSessionDependency(key=key))
    ]
    for prefix in target.prefixes():
        endpoints.add_async_dependency_routes(
            app, async_param, commit_in_route=False, prefix=prefix
        )
    app.add_middleware(async_sqla.AsyncSessionMiddleware, key=key)
    async_factory = async_sqla._async_session_factories[key]
    return built(app, lambda: async_factory.kw["bind"].dispose())


FASTAPI_SQLA = Contender(
    key="fastapi_sqla",
    label="fastapi-sqla",
    modes=frozenset({"sync", "async"}),
    build=build,
    requires=("fastapi_sqla",),
    note="opens a session (in a worker thread for sync) on every request, DB or not",
)
