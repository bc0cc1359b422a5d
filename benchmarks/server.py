"""The app uvicorn serves in the end-to-end runs, chosen by environment variables.

``BENCH_CONTENDER`` (a contender key) and ``BENCH_POSTGRES_URL``; the sync app (psycopg) is
built with a pool of ``BENCH_POOL_SIZE`` + ``BENCH_MAX_OVERFLOW`` connections.
"""

from __future__ import annotations

import asyncio
import os

from starlette.types import ASGIApp

from .contenders import BY_KEY, Built, Target
from .database import postgres_urls
from .e2e import CONTENDER_ENV, MAX_OVERFLOW_ENV, POOL_SIZE_ENV
from .logging_setup import configure_production_logging


def _target() -> Target:
    pool = {
        "pool_size": int(os.environ.get(POOL_SIZE_ENV, "40")),
        "max_overflow": int(os.environ.get(MAX_OVERFLOW_ENV, "10")),
    }
    return Target(mode="sync", urls=postgres_urls(), engine_kwargs=pool)


async def _build() -> Built:
    return await BY_KEY[os.environ[CONTENDER_ENV]].build(_target())


configure_production_logging()
# Building a sync app opens no async resources, so a throwaway event loop is fine.
app: ASGIApp = asyncio.run(_build()).app
