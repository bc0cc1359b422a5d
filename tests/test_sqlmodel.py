"""SQLModel sessions through the middleware: pass SQLModel's session class to the sessionmaker.

``sessionmaker(engine, class_=sqlmodel.Session)`` and
``async_sessionmaker(engine, class_=sqlmodel.ext.asyncio.session.AsyncSession)`` make the
request session a SQLModel session (``session.exec()``), decided and closed like any other.
"""

from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import sessionmaker

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import AsyncDBSession, DBSession

from .support import Backend

sqlmodel = pytest.importorskip(
    "sqlmodel", reason="SQLModel is optional: pip install sqlmodel (it is in the dev extra)"
)
from sqlmodel import Field, SQLModel, select  # noqa: E402
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession  # noqa: E402

pytestmark = pytest.mark.anyio


class Hero(SQLModel, table=True):
    __tablename__ = "ss_heroes"

    id: int | None = Field(default=None, primary_key=True)
    name: str


def hero_app(backend: Backend) -> FastAPI:
    """Routes that add a hero with the request session and answer the given status."""
    app = FastAPI()
    if backend.is_async:
        app.add_middleware(
            DBSessionMiddleware,
            async_sessionmaker=async_sessionmaker(
                cast(AsyncEngine, backend.engine),
                class_=SQLModelAsyncSession,
                expire_on_commit=False,
            ),
        )

        @app.post("/heroes/{name}/{status}")
        async def add_async(name: str, status: int, db: AsyncDBSession) -> JSONResponse:
            db.add(Hero(name=name))
            await db.flush()
            names = (await db.exec(select(Hero.name))).all()  # type: ignore[attr-defined]
            return JSONResponse(describe(db, names), status_code=status)

    else:
        app.add_middleware(
            DBSessionMiddleware,
            sessionmaker=sessionmaker(
                backend.sync_engine, class_=sqlmodel.Session, expire_on_commit=False
            ),
        )

        @app.post("/heroes/{name}/{status}")
        def add_sync(name: str, status: int, db: DBSession) -> JSONResponse:
            db.add(Hero(name=name))
            db.flush()
            names = db.exec(select(Hero.name)).all()  # type: ignore[attr-defined]
            return JSONResponse(describe(db, names), status_code=status)

    return app


def describe(session: Any, names: Any) -> dict[str, Any]:
    """The SQLModel class the session is (``sessionmaker`` makes a subclass of ``class_``)."""
    kind = next((k for k in type(session).__mro__ if k.__module__.startswith("sqlmodel")), None)
    name = None if kind is None else f"{kind.__module__}.{kind.__qualname__}"
    return {"session": name, "names": list(names)}


@pytest.fixture
def heroes(backend: Backend) -> Backend:
    """The backend with an empty ``ss_heroes`` table."""
    with backend.check.begin() as conn:
        Hero.__table__.drop(conn, checkfirst=True)  # type: ignore[attr-defined]
        Hero.__table__.create(conn)  # type: ignore[attr-defined]
    return backend


def hero_names(backend: Backend) -> list[str]:
    with sqlmodel.Session(backend.check) as session:
        return sorted(session.exec(select(Hero.name)).all())


async def post(app: FastAPI, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path)


async def test_the_request_session_is_the_sqlmodel_session_class_and_exec_works(
    heroes: Backend,
) -> None:
    response = await post(hero_app(heroes), "/heroes/ada/201")
    assert response.status_code == 201
    expected = (
        "sqlmodel.ext.asyncio.session.AsyncSession"
        if heroes.is_async
        else "sqlmodel.orm.session.Session"
    )
    assert response.json() == {"session": expected, "names": ["ada"]}
    assert hero_names(heroes) == ["ada"]


async def test_sqlmodel_request_sessions_commit_below_400_and_roll_back_from_400(
    heroes: Backend,
) -> None:
    app = hero_app(heroes)
    assert (await post(app, "/heroes/kept/200")).status_code == 200
    assert (await post(app, "/heroes/dropped/409")).status_code == 409
    assert (await post(app, "/heroes/failed/500")).status_code == 500
    assert hero_names(heroes) == ["kept"]
