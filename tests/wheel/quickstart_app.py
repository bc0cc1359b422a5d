"""The README's quick start, self-contained: what the ``wheel`` nox session serves under uvicorn.

The README's example as a user would complete it: the ``Item`` model it uses, a SQLite file
database (``QUICKSTART_DATABASE_URL``, default ``sqlite:///quickstart.db``) instead of a
PostgreSQL host, and one route that writes and then answers ``409``, so that a rollback can be
seen too. It imports only what ``pip install sessionscope[fastapi]`` installs (uvicorn serves it).
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from prometheus_client import make_asgi_app
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)


engine = sa.create_engine(os.environ.get("QUICKSTART_DATABASE_URL", "sqlite:///quickstart.db"))
Base.metadata.create_all(engine)

app = FastAPI()
app.add_middleware(DBSessionMiddleware, engine=engine, exclude_paths=("/metrics", "/healthz"))


@app.post("/items", status_code=201)
def create_item(name: str, db: DBSession) -> dict[str, int]:
    item = Item(name=name)
    db.add(item)
    db.flush()  # no commit here: the 201 commits, a 4xx/5xx or an exception rolls back
    return {"id": item.id}


@app.post("/items/held", status_code=201)
def hold_item(name: str, db: DBSession) -> dict[str, int]:
    db.add(Item(name=name))
    db.flush()  # written, then refused: the 409 rolls it back
    raise HTTPException(status_code=409, detail=f"{name!r} is held for review")


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


app.mount("/metrics", make_asgi_app())
