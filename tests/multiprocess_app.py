"""The app the multiprocess test serves with two uvicorn workers (not a test module).

The database URL comes from SESSIONSCOPE_MP_DATABASE_URL; prometheus_client writes metric
values to files in PROMETHEUS_MULTIPROC_DIR, and /metrics merges the files of all workers.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession

from .support import items

engine = sa.create_engine(os.environ["SESSIONSCOPE_MP_DATABASE_URL"])
app = FastAPI()
app.add_middleware(DBSessionMiddleware, engine=engine, exclude_paths=("/metrics",))


@app.post("/items/{name}", status_code=201)
def create(name: str, db: DBSession) -> dict[str, int]:
    db.execute(items.insert().values(name=name))
    return {"pid": os.getpid()}


@app.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
