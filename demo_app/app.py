"""The demo application: one route per behaviour of the request session.

``create_app(Settings(...))`` builds a fresh app with its own engine and metrics registry, so
tests can build as many as they like; ``demo_app.main`` builds the one ``make demo`` serves.
Every route is ``async def`` and runs its database code as a plain sync function through
:func:`run`, so the same routes work with a sync driver (run in a worker thread) and an async
one (``AsyncSession.run_sync``).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Final, TypeVar

import anyio
import anyio.to_thread
import sqlalchemy as sa
import structlog
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from starlette.types import ASGIApp

from sessionscope import DBSessionMiddleware, SessionClosedError, session_scope
from sessionscope.fastapi import get_session

T = TypeVar("T")
AnySession = Session | AsyncSession

log = structlog.get_logger("demo_app")

DEFAULT_DATABASE_URL = "sqlite:///demo.db"
HOLD_DEFAULT_SECONDS = 420.0
"""How long ``/hold`` keeps its session: 7 minutes, past the ``for: 5m`` of the leak alert."""
HOLD_MAX_SECONDS = 3600.0
"""The longest ``/hold`` accepts: an hour, so a forgotten request does not hold a connection
for the life of the demo."""
METRICS_PATHS = ("/metrics", "/metrics/")
"""The exposition is mounted at ``/metrics`` (Starlette redirects it to ``/metrics/``)."""


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What the demo can be configured with; :meth:`from_env` reads the environment."""

    database_url: str = DEFAULT_DATABASE_URL
    leak_threshold: float = 2.0
    """Seconds after which an open session is reported as a suspected leak (small for the demo)."""
    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout: float = 10.0
    closed_log_level: str = "info"
    leak_exempt_routes: tuple[str, ...] = ("/export",)
    extra: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for ``DBSessionMiddleware``."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """``DATABASE_URL``, ``DEMO_LEAK_THRESHOLD``, ``DEMO_POOL_SIZE``, ``DEMO_MAX_OVERFLOW``,
        ``DEMO_POOL_TIMEOUT`` and ``DEMO_CLOSED_LOG_LEVEL``; unset ones keep their default."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            database_url=env.get("DATABASE_URL", default.database_url),
            leak_threshold=float(env.get("DEMO_LEAK_THRESHOLD", default.leak_threshold)),
            pool_size=int(env.get("DEMO_POOL_SIZE", default.pool_size)),
            max_overflow=int(env.get("DEMO_MAX_OVERFLOW", default.max_overflow)),
            pool_timeout=float(env.get("DEMO_POOL_TIMEOUT", default.pool_timeout)),
            closed_log_level=env.get("DEMO_CLOSED_LOG_LEVEL", default.closed_log_level),
        )


# ------------------------------------------------------------------------------------ models


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "demo_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    stock: Mapped[int] = mapped_column(default=10)
    notes: Mapped[list[Note]] = relationship(back_populates="item", lazy="select")


class Note(Base):
    __tablename__ = "demo_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Checked at COMMIT, not at INSERT: a bad item_id makes the commit itself fail.
    item_id: Mapped[int] = mapped_column(
        sa.ForeignKey(Item.id, deferrable=True, initially="DEFERRED")
    )
    text: Mapped[str] = mapped_column(sa.String(500))
    item: Mapped[Item] = relationship(back_populates="notes")


class Event(Base):
    """An audit trail written by background tasks."""

    __tablename__ = "demo_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(50))
    item_id: Mapped[int | None]
    at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, examples=["teapot"])
    stock: int = Field(default=10, ge=0)


class ItemOut(BaseModel):
    id: int
    name: str
    stock: int


class NoteIn(BaseModel):
    text: str = Field(min_length=1, max_length=500, examples=["handle with care"])


def _out(item: Item) -> ItemOut:
    return ItemOut(id=item.id, name=item.name, stock=item.stock)


# ---------------------------------------------------------------------------------- database


def make_engine(settings: Settings) -> Engine | AsyncEngine:
    """A sync or async engine for ``settings.database_url`` (the driver decides which)."""
    url = make_url(settings.database_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
    }
    sqlite = url.get_backend_name() == "sqlite"
    if sqlite:
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine: Engine | AsyncEngine
    if url.get_dialect().is_async:
        engine = create_async_engine(url, **kwargs)
    else:
        engine = sa.create_engine(url, **kwargs)
    if sqlite:
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        sa.event.listen(sync, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # needed for the deferred foreign key
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writers
    except sqlite3.OperationalError as exc:
        # Switching to WAL needs the database to itself and does not wait for it: a worker
        # starting while another creates the schema is refused. WAL is a setting of the file,
        # kept once made, so the worker holding the lock (or the next connection) makes it.
        if "locked" not in str(exc):
            raise
    cursor.close()


SCHEMA_LOCK: Final = 0x5E55_1015_C0DE
"""The PostgreSQL advisory lock the workers take in turn to create the demo's tables."""


def create_schema(connection: sa.Connection) -> None:
    """Create the tables that are missing, one process at a time.

    Several workers start at once: each would see the tables missing and run CREATE TABLE, and
    all but one would fail (``pg_type_typname_nsp_index`` on PostgreSQL, ``table ... already
    exists`` on SQLite). A transaction-scoped advisory lock on PostgreSQL, the write lock on
    SQLite, makes them wait for each other; DDL is transactional on both, so the next one sees
    the committed tables and creates nothing.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK)))
    elif connection.dialect.name == "sqlite":
        # The database's write lock, taken before looking at the tables (the driver would only
        # begin a transaction at the first INSERT); the others wait up to the busy timeout.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    Base.metadata.create_all(connection)


async def create_tables(engine: Engine | AsyncEngine) -> None:
    """:func:`create_schema` in one transaction (committed when it returns)."""
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as conn:
            await conn.run_sync(create_schema)
    else:

        def create() -> None:
            with engine.begin() as conn:
                create_schema(conn)

        await anyio.to_thread.run_sync(create)


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """The Prometheus exposition: of ``registry``, or, when ``PROMETHEUS_MULTIPROC_DIR`` is set
    (several worker processes), of every worker's metrics merged from that directory.

    The merging registry is a fresh one with only a ``MultiProcessCollector``: the metrics
    themselves are written to the directory by each worker, whatever registry they are in.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return make_asgi_app(registry=merged)
    return make_asgi_app(registry=registry)


async def run(session: AnySession, fn: Callable[[Session], T]) -> T:
    """Run ``fn(session)``: in the greenlet of an ``AsyncSession``, else in a worker thread."""
    if isinstance(session, AsyncSession):
        return await session.run_sync(fn)
    return await anyio.to_thread.run_sync(fn, session)


Db = Annotated[AnySession, Depends(get_session())]
"""The request session (``Session`` or ``AsyncSession``, as the engine decides)."""


# ------------------------------------------------------------------------------------ routes

DESCRIPTION = """
Every route shows one behaviour of `sessionscope.DBSessionMiddleware`: the request's session
is committed or rolled back **before the client sees the status**, and always closed.

* 2xx/3xx commit; 4xx/5xx and exceptions roll back; a commit that fails becomes a 500.
* Sessions older than the leak threshold (`DEMO_LEAK_THRESHOLD`, {threshold:g} s here) are
  reported as suspected leaks.
* `/metrics` is the Prometheus exposition; `python -m demo_app.load` sends traffic to every
  route.
"""

TAGS = [
    {"name": "commit", "description": "Requests whose transaction commits."},
    {"name": "rollback", "description": "Requests whose transaction is rolled back."},
    {"name": "leaks", "description": "Sessions held too long, or used after their request."},
    {"name": "late", "description": "Work after the response started (streaming, tasks)."},
    {"name": "statements", "description": "Statement counting (N+1 detection)."},
    {"name": "ops", "description": "Health and metrics; these get no session."},
]


def _document_the_metrics_mount(app: FastAPI) -> None:
    """FastAPI leaves mounted apps out of its OpenAPI schema: add the exposition by hand."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # builds the schema and keeps it in app.openapi_schema
        schema["paths"]["/metrics/"] = {
            "get": {
                "tags": ["ops"],
                "summary": "Prometheus exposition of the session, leak and pool metrics",
                "description": "The `prometheus_client` ASGI app with this app's registry, "
                "mounted at `/metrics` (`/metrics` redirects here; scrape with "
                "`metrics_path: /metrics/`). Excluded from the middleware: a scrape opens "
                "no session.",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "The metrics in the Prometheus text format (or "
                        "OpenMetrics when the scraper asks for it).",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A demo app with its own engine and metrics registry; tables are created at startup."""
    settings = settings or Settings()
    engine = make_engine(settings)
    registry = CollectorRegistry()
    detached: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await create_tables(engine)
        log.info("demo.started", database=engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            for task in list(detached):
                task.cancel()
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()

    app = FastAPI(
        title="sessionscope demo",
        description=DESCRIPTION.format(threshold=settings.leak_threshold),
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.registry = registry
    app.state.settings = settings
    app.add_middleware(
        DBSessionMiddleware,
        engine=engine,
        exclude_paths=(*METRICS_PATHS, "/healthz"),
        metrics=True,
        registry=registry,
        leak_threshold=settings.leak_threshold,
        leak_exempt_routes=settings.leak_exempt_routes,
        closed_log_level=settings.closed_log_level,
        **settings.extra,
    )
    app.mount("/metrics", metrics_app(registry))
    _document_the_metrics_mount(app)

    # -- commit ----------------------------------------------------------------------------

    @app.post(
        "/items",
        status_code=201,
        tags=["commit"],
        summary="Create an item (committed before the 201 is sent)",
        description="Inserts a row; the middleware commits it when the app sends 201, so the "
        "client never sees a 201 for a row that is not there. A duplicate name is a 409 "
        "(rolled back).",
    )
    async def create_item(item: ItemIn, db: Db) -> ItemOut:
        def insert(s: Session) -> ItemOut | None:
            if s.scalar(sa.select(Item.id).where(Item.name == item.name)) is not None:
                return None
            row = Item(name=item.name, stock=item.stock)
            s.add(row)
            s.flush()
            return _out(row)

        created = await run(db, insert)
        if created is None:
            raise HTTPException(409, f"an item named {item.name!r} exists")
        return created

    @app.get(
        "/items",
        tags=["commit"],
        summary="List items (a read-only transaction, committed)",
    )
    async def list_items(db: Db, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[ItemOut]:
        def select(s: Session) -> list[ItemOut]:
            return [_out(i) for i in s.scalars(sa.select(Item).order_by(Item.id).limit(limit))]

        return await run(db, select)

    @app.get(
        "/items/{item_id}",
        tags=["commit"],
        summary="Read one item (404 when missing: rolled back, nothing to undo)",
    )
    async def read_item(item_id: int, db: Db) -> ItemOut:
        def get(s: Session) -> ItemOut | None:
            row = s.get(Item, item_id)
            return None if row is None else _out(row)

        found = await run(db, get)
        if found is None:
            raise HTTPException(404, "no such item")
        return found

    @app.post(
        "/items/{item_id}/notes",
        status_code=201,
        tags=["commit"],
        summary="Add a note to an item (committed)",
    )
    async def add_note(item_id: int, note: NoteIn, db: Db) -> dict[str, int]:
        def insert(s: Session) -> int | None:
            if s.get(Item, item_id) is None:
                return None
            row = Note(item_id=item_id, text=note.text)
            s.add(row)
            s.flush()
            return row.id

        note_id = await run(db, insert)
        if note_id is None:
            raise HTTPException(404, "no such item")
        return {"id": note_id, "item_id": item_id}

    # -- rollback --------------------------------------------------------------------------

    @app.post(
        "/items/{item_id}/reserve",
        tags=["rollback"],
        summary="Reserve stock: 409 after writing when there is not enough (rolled back)",
        description="Decrements the stock first, then finds it negative and answers 409. The "
        "decrement was written to the database, and the middleware rolls it back because the "
        "status is 4xx: the stock is unchanged.",
        responses={409: {"description": "not enough stock; the decrement is rolled back"}},
    )
    async def reserve(item_id: int, db: Db, qty: Annotated[int, Query(ge=1)] = 1) -> JSONResponse:
        def decrement(s: Session) -> int | None:
            s.execute(sa.update(Item).where(Item.id == item_id).values(stock=Item.stock - qty))
            return s.scalar(sa.select(Item.stock).where(Item.id == item_id))

        left = await run(db, decrement)
        if left is None:
            return JSONResponse({"detail": "no such item"}, status_code=404)
        if left < 0:
            return JSONResponse({"detail": "not enough stock", "short_by": -left}, 409)
        return JSONResponse({"item_id": item_id, "stock": left})

    @app.post(
        "/boom",
        tags=["rollback"],
        summary="Write, then raise: 500, rolled back (reason exception)",
        description="Inserts an item named `boom` and raises before responding. The "
        "middleware rolls the insert back; the server answers 500.",
    )
    async def boom(db: Db) -> None:
        def insert(s: Session) -> None:
            s.add(Item(name="boom"))
            s.flush()

        await run(db, insert)
        raise RuntimeError("the demo route /boom always fails after writing")

    @app.post(
        "/notes/orphan",
        tags=["rollback"],
        summary="A commit that fails: a deferred foreign key violated at COMMIT (500)",
        description="Inserts a note for an item that does not exist. The foreign key is "
        "DEFERRABLE INITIALLY DEFERRED, so the INSERT succeeds and the COMMIT fails. The app "
        "returned 201, but the middleware sees the failed commit before the status is sent and "
        "answers a complete 500 instead (rollback reason commit_error).",
        status_code=201,
    )
    async def orphan_note(db: Db) -> dict[str, str]:
        def insert(s: Session) -> None:
            s.add(Note(item_id=-1, text="orphan"))
            s.flush()  # the deferred foreign key is not checked here

        await run(db, insert)
        return {"status": "the client never sees this: the commit fails"}

    # -- leaks -----------------------------------------------------------------------------

    @app.get(
        "/slow",
        tags=["leaks"],
        summary="Hold a session (and its connection) past the leak threshold",
        description="Runs a query, then sleeps `seconds` while the session holds its "
        "connection. Past the leak threshold the session is counted in "
        "`db_sessions_leak_suspected` and logged as a suspected leak; when it closes, the leak "
        "is resolved.",
    )
    async def slow(db: Db, seconds: Annotated[float, Query(ge=0, le=120)] = 3.0) -> dict[str, Any]:
        count = await run(db, lambda s: s.scalar(sa.select(sa.func.count()).select_from(Item)))
        await anyio.sleep(seconds)
        return {"held_seconds": seconds, "items": count}

    @app.get(
        "/hold",
        tags=["leaks"],
        summary="Hold one session for minutes: long enough for the leak alerts to fire",
        description="Runs a query, then keeps the session (and its pooled connection) open for "
        f"`seconds` (at most {HOLD_MAX_SECONDS:g}), or until the client disconnects, whichever "
        "comes first. `/slow` stops at 120 s, shorter than the `for: 5m` of "
        "`DbSessionLeakSuspected`; this route outlasts it. "
        "`python -m demo_app.load --scenario leak` calls it; docs/alerts.md shows the alerts "
        "go pending, firing and resolved.",
    )
    async def hold(
        request: Request,
        db: Db,
        seconds: Annotated[float, Query(gt=0, le=HOLD_MAX_SECONDS)] = HOLD_DEFAULT_SECONDS,
    ) -> dict[str, Any]:
        count = await run(db, lambda s: s.scalar(sa.select(sa.func.count()).select_from(Item)))
        started = anyio.current_time()
        deadline = started + seconds
        client_left = False
        while (left := deadline - anyio.current_time()) > 0:
            if await request.is_disconnected():
                client_left = True  # Ctrl-C on the load generator releases the session now
                break
            await anyio.sleep(min(1.0, left))
        held = round(anyio.current_time() - started, 3)
        return {"held_seconds": held, "client_left": client_left, "items": count}

    @app.post(
        "/fire-and-forget",
        status_code=202,
        tags=["leaks"],
        summary="Use the request session from a task that outlives the request",
        description="Starts a detached task that uses the request session 0.2 s later, after "
        "the request finished. The session refuses (SessionClosedError) and the use is "
        "counted in `db_session_use_after_close_total`. Work that outlives a request must "
        "open its own session with `session_scope`.",
    )
    async def fire_and_forget(db: Db) -> dict[str, str]:
        await run(db, lambda s: s.scalar(sa.select(1)))

        async def later() -> None:
            await anyio.sleep(0.2)
            try:
                await run(db, lambda s: s.scalar(sa.select(1)))
            except SessionClosedError as exc:
                log.warning("demo.fire_and_forget_refused", error=str(exc))

        task = asyncio.get_running_loop().create_task(later())
        detached.add(task)
        task.add_done_callback(detached.discard)
        return {"status": "started a task that will use this request's session too late"}

    # -- late ------------------------------------------------------------------------------

    @app.get(
        "/export",
        tags=["late"],
        summary="Stream every item as CSV, read through the request session while streaming",
        description="The transaction is decided when the 200 starts; the body is read in "
        "batches afterwards through the same session (reads after the decision are not late "
        "writes). The route is exempt from leak detection: long exports are expected.",
        response_class=StreamingResponse,
    )
    async def export(db: Db, batch: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        async def rows() -> AsyncIterator[str]:
            yield "id,name,stock\n"
            last = 0
            while True:

                def page(s: Session, after: int = last) -> list[tuple[int, str, int]]:
                    stmt = (
                        sa.select(Item.id, Item.name, Item.stock)
                        .where(Item.id > after)
                        .order_by(Item.id)
                        .limit(batch)
                    )
                    return [(r.id, r.name, r.stock) for r in s.execute(stmt)]

                found = await run(db, page)
                if not found:
                    return
                for id_, name, stock in found:
                    yield f"{id_},{name},{stock}\n"
                last = found[-1][0]

        return StreamingResponse(rows(), media_type="text/csv")

    @app.post(
        "/items/{item_id}/audit",
        status_code=202,
        tags=["late"],
        summary="Background task writing with its own session_scope (committed)",
        description="Responds 202, then a background task records an `audit` event in a "
        "session of its own (`session_scope`), which commits it.",
    )
    async def audit(item_id: int, tasks: BackgroundTasks) -> dict[str, str]:
        async def write() -> None:
            async with session_scope(engine) as s:
                await run(s, lambda s: s.add(Event(kind="audit", item_id=item_id)))

        tasks.add_task(write)
        return {"status": "an audit event will be committed by its own session"}

    @app.post(
        "/items/{item_id}/audit-late",
        status_code=202,
        tags=["late"],
        summary="Background task writing through the request session (rolled back, reported)",
        description="Responds 202, then a background task adds an `audit-late` event through "
        "the *request* session, after the transaction was decided, and never commits. The "
        "middleware rolls it back at close and logs `db_session.late_write` (rollback reason "
        "late_write): the event is never stored.",
    )
    async def audit_late(item_id: int, db: Db, tasks: BackgroundTasks) -> dict[str, str]:
        def insert(s: Session) -> None:
            s.add(Event(kind="audit-late", item_id=item_id))
            s.flush()

        async def write() -> None:
            await run(db, insert)

        tasks.add_task(write)
        return {"status": "an audit event will be written too late and rolled back"}

    # -- statements ------------------------------------------------------------------------

    @app.get(
        "/items-with-notes",
        tags=["statements"],
        summary="N+1: one query for the items, one more per item for its notes",
        description="Lazy-loads `item.notes` one item at a time: 1 + N statements per request, "
        "visible in `db_statements_total` / `db_session_statements`.",
    )
    async def items_with_notes(
        db: Db, limit: Annotated[int, Query(ge=1, le=200)] = 20
    ) -> list[dict[str, Any]]:
        def load(s: Session) -> list[dict[str, Any]]:
            items = s.scalars(sa.select(Item).order_by(Item.id).limit(limit)).all()
            return [{"id": i.id, "name": i.name, "notes": [n.text for n in i.notes]} for i in items]

        return await run(db, load)

    # -- ops -------------------------------------------------------------------------------

    @app.get("/time", tags=["ops"], summary="Never touches the database: no session is created")
    async def now() -> dict[str, str]:
        return {"now": datetime.now(UTC).isoformat()}

    @app.get("/healthz", tags=["ops"], summary="Liveness; excluded from the middleware")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
