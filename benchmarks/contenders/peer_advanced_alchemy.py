"""advanced-alchemy's FastAPI extension with ``commit_mode="autocommit"`` (commits 2xx)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI

from .. import endpoints
from .base import Built, Contender, Target, built


async def build(target: Target) -> Built:
    """An app with ``AdvancedAlchemy`` and its ``provide_session()`` dependency."""
    from advanced_alchemy.extensions.fastapi import (  # type: ignore[import-not-found, unused-ignore]
        AdvancedAlchemy,
        SQLAlchemyAsyncConfig,
        SQLAlchemySyncConfig,
    )
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import Session

    app = FastAPI()
    endpoints.add_nodb_route(app)
    if target.mode == "sync":
        engine: Any = create_engine(target.url, **target.engine_kwargs)
        config: Any = SQLAlchemySyncConfig(engine_instance=engine, commit_mode="autocommit")
        alchemy = AdvancedAlchemy(config=config, app=app)
        param: Any = Annotated[Session, Depends(alchemy.provide_session())]
        for prefix in target.prefixes():
            endpoints.add_sync_dependency_routes(app, param, commit_in_route=False, prefix=prefix)
    else:
        engine = create_async_engine(target.url, **target.engine_kwargs)
        config = SQLAlchemyAsyncConfig(engine_instance=engine, commit_mode="autocommit")
        alchemy = AdvancedAlchemy(config=config, app=app)
        param = Annotated[AsyncSession, Depends(alchemy.provide_session())]
        for prefix in target.prefixes():
            endpoints.add_async_dependency_routes(app, param, commit_in_route=False, prefix=prefix)
    return built(app, engine.dispose)


ADVANCED_ALCHEMY = Contender(
    key="advanced_alchemy",
    label="advanced-alchemy (autocommit)",
    modes=frozenset({"sync", "async"}),
    build=build,
    requires=("advanced_alchemy",),
    note="commits after the response has been sent",
)
