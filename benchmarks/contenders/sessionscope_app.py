"""sessionscope's ``DBSessionMiddleware``, with metrics and logging on (defaults) or off.

The routes take the session as a ``DBSession``/``AsyncDBSession`` parameter; one more contender
reads it from ``request.state.db`` instead, without a FastAPI dependency.

"On" is the default configuration with structlog filtering below INFO, as a production app
configures it (see :func:`benchmarks.logging_setup.configure_production_logging`), and a
registry of its own. "Off" passes ``metrics=False`` and ``closed_log_level=None`` when the
installed middleware has those options; :func:`off_supported` says whether it does.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from fastapi import FastAPI
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import StaticPool

from .. import endpoints
from .base import Built, Contender, Target, built


def _middleware() -> Any:
    from sessionscope import DBSessionMiddleware

    return DBSessionMiddleware


def _parameters() -> set[str]:
    return set(inspect.signature(_middleware().__init__).parameters)


_OFF: dict[str, Any] = {"metrics": False, "closed_log_level": None}


@functools.cache
def off_supported() -> bool:
    """Whether ``DBSessionMiddleware`` accepts ``metrics=False, closed_log_level=None``."""
    if not _OFF.keys() <= _parameters():
        return False
    engine = create_engine("sqlite://", poolclass=StaticPool)
    try:
        _middleware()(FastAPI(), engine=engine, **_OFF)
    except Exception:  # an older signature that refuses None
        return False
    finally:
        engine.dispose()
    return True


def _options(observed: bool) -> dict[str, Any]:
    if not observed:
        return dict(_OFF) if off_supported() else {}
    if "registry" in _parameters():
        from prometheus_client import CollectorRegistry

        return {"registry": CollectorRegistry()}
    return {}


def _builder(observed: bool, *, via_state: bool = False) -> Any:
    async def build(target: Target) -> Built:
        from sessionscope.fastapi import AsyncDBSession, DBSession

        app = FastAPI()
        endpoints.add_nodb_route(app)
        if via_state:
            if target.route_copies != 1 or target.hold_gate is not None:
                raise ValueError("the request.state.db contender serves no route copies or /hold")
            make: Any = create_engine if target.mode == "sync" else create_async_engine
            state_engine = make(target.url, **target.engine_kwargs)
            endpoints.add_state_routes(app, target.mode)
            app.add_middleware(_middleware(), engine=state_engine, **_options(observed))
            return built(app, state_engine.dispose)
        if target.mode == "sync":
            engine: Any = create_engine(target.url, **target.engine_kwargs)
            for prefix in target.prefixes():
                endpoints.add_sync_dependency_routes(
                    app, DBSession, commit_in_route=False, prefix=prefix
                )
            param: Any = DBSession
        else:
            engine = create_async_engine(target.url, **target.engine_kwargs)
            for prefix in target.prefixes():
                endpoints.add_async_dependency_routes(
                    app, AsyncDBSession, commit_in_route=False, prefix=prefix
                )
            param = AsyncDBSession
        if target.hold_gate is not None:
            endpoints.add_hold_route(app, param, target.hold_gate)
        app.add_middleware(_middleware(), engine=engine, **_options(observed))
        return built(app, engine.dispose)

    return build


SESSIONSCOPE_ON = Contender(
    key="ss_on",
    label="sessionscope (metrics+logging on)",
    modes=frozenset({"sync", "async"}),
    build=_builder(True),
    requires=("sessionscope",),
    scaling=True,
)
SESSIONSCOPE_STATE = Contender(
    key="ss_state",
    label="sessionscope via request.state.db (metrics+logging on)",
    modes=frozenset({"sync", "async"}),
    build=_builder(True, via_state=True),
    requires=("sessionscope",),
    note="the route reads `request.state.db` instead of declaring `DBSession`: FastAPI "
    "solves no dependency, as with the peers' `db.session` proxies; not what the targets judge",
)
SESSIONSCOPE_OFF = Contender(
    key="ss_off",
    label="sessionscope (metrics+logging off)",
    modes=frozenset({"sync", "async"}),
    build=_builder(False),
    requires=("sessionscope",),
    scaling=True,
)
