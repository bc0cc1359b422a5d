"""What the docs' partial examples stand on: ``<!-- runnable with NAME -->`` runs a block with
the setup ``NAME`` — code before it, code after it, and the files of a small user project (a
``myapp`` package) beside it — so that a snippet showing one part of a project is executed too."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Setup:
    before: str = ""
    after: str = ""
    files: dict[str, str] = field(default_factory=dict)


_ENGINES = """\
import tempfile

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

_folder = tempfile.mkdtemp()
engine = sa.create_engine(f"sqlite:///{_folder}/app.db")
replica_engine = sa.create_engine(f"sqlite:///{_folder}/replica.db")
async_engine = create_async_engine(f"sqlite+aiosqlite:///{_folder}/app.db")
"""

_SERVE_LIFESPAN = """
from starlette.testclient import TestClient

if "app" not in globals():
    app = FastAPI(lifespan=lifespan)
with TestClient(app):  # startup (the database check), then shutdown (the disposal)
    pass
"""

_MODELS = """\
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
"""

_ROUTES = """
class NewItem(BaseModel):
    name: str


app = FastAPI()
app.add_middleware(DBSessionMiddleware, engine=engine)


@app.get("/items")
{async_}def list_items(db: {dependency}) -> list[dict[str, str]]:
    return [{{"name": name}} for name in ({await_}db.scalars(sa.select(Item.name))).all()]


@app.post("/items", status_code=201)
{async_}def create_item(new: NewItem, db: {dependency}) -> None:
    db.add(Item(name=new.name))
    {await_}db.flush()
    if new.name == "taken":
        raise HTTPException(409, "taken")  # rolled back by its status
"""

_MAIN_HEAD = """\
import tempfile

import sqlalchemy as sa
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
{engine_import}
from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import {dependency}

from .models import Base, Item

_file = f"{{tempfile.mkdtemp()}}/app.db"
_schema = sa.create_engine(f"sqlite:///{{_file}}")
Base.metadata.create_all(_schema)
_schema.dispose()
engine = {engine}
"""

_SYNC_MAIN = _MAIN_HEAD.format(
    engine_import="",
    dependency="DBSession",
    engine='sa.create_engine(f"sqlite:///{_file}")',
) + _ROUTES.format(async_="", await_="", dependency="DBSession")
_ASYNC_MAIN = _MAIN_HEAD.format(
    engine_import="from sqlalchemy.ext.asyncio import create_async_engine",
    dependency="AsyncDBSession",
    engine='create_async_engine(f"sqlite+aiosqlite:///{_file}")',
) + _ROUTES.format(async_="async ", await_="await ", dependency="AsyncDBSession")

_CONFTEST = """\
import pytest

from myapp.main import app, engine


@pytest.fixture
def sessionscope_engine():
    return engine


@pytest.fixture
def sessionscope_app():
    return app
"""


def _project(main: str, conftest: bool) -> dict[str, str]:
    files = {"myapp/__init__.py": "", "myapp/models.py": _MODELS, "myapp/main.py": main}
    if conftest:
        files["conftest.py"] = _CONFTEST
    return files


SETUPS: dict[str, Setup] = {
    "engines": Setup(before=_ENGINES + "from fastapi import FastAPI\n"),
    "a lifespan": Setup(
        before=_ENGINES
        + "from contextlib import asynccontextmanager\n\nimport httpx\nfrom fastapi import "
        "FastAPI\nfrom sessionscope.lifespan import database_lifespan\n\n\n"
        "def make_cache() -> dict[str, str]:\n    return {}\n",
        after=_SERVE_LIFESPAN,
    ),
    "a FastAPI app": Setup(
        before=_ENGINES
        + "from fastapi import FastAPI\nfrom sessionscope import DBSessionMiddleware\n\n"
        "app = FastAPI()\n",
        after="\nfrom starlette.testclient import TestClient\n\n"
        "TestClient(app).get('/')  # builds the middleware stack\n",
    ),
    "myapp": Setup(files=_project(_SYNC_MAIN, conftest=False)),
    "myapp and its conftest": Setup(files=_project(_SYNC_MAIN, conftest=True)),
    "an async myapp and its conftest": Setup(files=_project(_ASYNC_MAIN, conftest=True)),
}
