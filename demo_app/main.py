"""A small FastAPI app on SQLite that shows the request session at work.

Run it with ``make demo`` (http://127.0.0.1:8000/docs). ``DATABASE_URL`` switches the database.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///demo.db")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)


class ItemIn(BaseModel):
    name: str


engine = sa.create_engine(DATABASE_URL)
Base.metadata.create_all(engine)

app = FastAPI(title="sessionscope demo")
app.add_middleware(DBSessionMiddleware, engine=engine, exclude_paths=("/healthz",))


@app.post("/items", status_code=201, summary="Create an item (committed before the 201 is sent)")
def create_item(item: ItemIn, db: DBSession) -> dict[str, object]:
    row = Item(name=item.name)
    db.add(row)
    db.flush()
    return {"id": row.id, "name": row.name}


@app.get("/items/{item_id}", summary="Read one item")
def read_item(item_id: int, db: DBSession) -> dict[str, object]:
    row = db.get(Item, item_id)
    if row is None:
        raise HTTPException(404, "no such item")
    return {"id": row.id, "name": row.name}


@app.get("/healthz", summary="Liveness; gets no session")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
