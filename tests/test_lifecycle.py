"""The request session's lifecycle through a raw ASGI harness, on every backend.

Each test asserts the order in which the client received messages and the database saw
COMMIT/ROLLBACK, the rows left in the database, and (through the ``backend`` fixture) that no
connection stays checked out.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from sessionscope import DBSessionMiddleware, SessionClosedError

from .support import BACKENDS, Backend, Exchange, children, http_scope, items, request

pytestmark = pytest.mark.anyio

START = ("SEND", "http.response.start")


def order(log: list[tuple[Any, ...]]) -> list[str]:
    """COMMIT / ROLLBACK / start:<status> / body, in the order they happened."""
    out = []
    for entry in log:
        if entry[0] == "SEND":
            out.append(f"start:{entry[2]}" if entry[1] == "http.response.start" else "body")
        else:
            out.append(entry[0])
    return out


def json_app(backend: Backend, status: int, *, write: str | None = None) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        if write:
            await backend.insert(session, write)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return DBSessionMiddleware(app, engine=backend.engine)


async def test_commits_before_the_client_receives_a_2xx_status(backend: Backend) -> None:
    ex = await request(json_app(backend, 201, write="a"), log=backend.log)
    assert ex.status == 201
    assert order(backend.log) == ["COMMIT", "start:201", "body"]
    assert backend.names() == ["a"]


async def test_rolls_back_before_the_client_receives_a_4xx_status(backend: Backend) -> None:
    ex = await request(json_app(backend, 409, write="conflict"), log=backend.log)
    assert ex.status == 409
    assert order(backend.log) == ["ROLLBACK", "start:409", "body"]
    assert backend.names() == []


async def test_rolls_back_a_returned_5xx(backend: Backend) -> None:
    await request(json_app(backend, 503, write="x"), log=backend.log)
    assert order(backend.log) == ["ROLLBACK", "start:503", "body"]
    assert backend.names() == []


async def test_custom_commit_on_decides_by_status(backend: Backend) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], scope["path"].strip("/"))
        status = int(scope["path"].strip("/x"))
        await send({"type": "http.response.start", "status": status})
        await send({"type": "http.response.body"})

    mw = DBSessionMiddleware(app, engine=backend.engine, commit_on=lambda s: s in (200, 409))
    for path in ("/x409", "/x302", "/x200"):
        await request(mw, path)
    assert backend.names() == ["x200", "x409"]


async def test_commit_failure_becomes_a_complete_500_and_drops_the_apps_messages(
    backend: Backend,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        # A child row pointing at no parent: the deferred foreign key fails only at COMMIT.
        await backend.run(
            session, lambda s: s.execute(children.insert().values(id=1, parent_id=99))
        )
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b'{"ok":', "more_body": True})
        await send({"type": "http.response.body", "body": b"1}"})

    with capture_logs() as logs:
        ex = await request(DBSessionMiddleware(app, engine=backend.engine), log=backend.log)
    ex.assert_well_formed()
    assert ex.status == 500
    assert ex.headers["content-type"] == "application/json"
    assert int(ex.headers["content-length"]) == len(ex.body)
    assert "x-app" not in ex.headers
    assert ex.body == b'{"detail": "Internal Server Error"}'
    # the COMMIT was attempted (and failed) before anything reached the client
    assert order(backend.log)[0] == "COMMIT"
    assert order(backend.log)[-2:] == ["start:500", "body"]
    failed = [e for e in logs if e["event"] == "db_session.commit_failed"]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["error_type"] == "IntegrityError"
    assert "error" not in failed[0]  # no message text: it could quote SQL parameters
    assert (
        "ForeignKey" in failed[0]["driver_error"] or failed[0]["driver_error"] == "IntegrityError"
    )
    assert failed[0].get("sqlstate", "23503") == "23503"  # PostgreSQL: foreign_key_violation
    assert "_commit_impl" in failed[0]["traceback"]
    with backend.check.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(children)).scalar() == 0


async def test_exception_before_the_response_rolls_back_and_propagates_unchanged(
    backend: Backend,
) -> None:
    boom = LookupError("boom")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "lost")
        raise boom

    with pytest.raises(LookupError) as raised:
        await request(DBSessionMiddleware(app, engine=backend.engine), log=backend.log)
    assert raised.value is boom
    assert order(backend.log) == ["ROLLBACK"]
    assert backend.names() == []


async def test_cleanup_error_is_logged_and_never_masks_the_apps_exception(
    backend: Backend,
) -> None:
    boom = KeyError("app error")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.insert(session, "x")
        sync = session if isinstance(session, sa.orm.Session) else session.sync_session

        def broken_close(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("close failed")

        # the next close fails once; invalidate() still returns the connection
        original = sync.close
        sync.close = broken_close  # type: ignore[method-assign]
        scope["restore"] = (sync, original)
        raise boom

    with capture_logs() as logs, pytest.raises(KeyError) as raised:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert raised.value is boom
    cleanup = [e for e in logs if e["event"] == "db_session.cleanup_failed"]
    assert [e["phase"] for e in cleanup] == ["close"]
    assert backend.names() == []


async def test_session_is_created_on_first_access_and_a_request_that_never_asks_gets_none(
    backend: Backend,
) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/db":
            seen.append(scope["state"]["db"])
            seen.append(scope["state"]["db"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    mw = DBSessionMiddleware(app, engine=backend.engine)
    with capture_logs() as logs:
        await request(mw, "/none")
        await request(mw, "/db")
        await request(mw, "/db")
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [e["outcome"] for e in closed] == ["unused", "unused"]
    assert seen[0] is seen[1]
    assert seen[2] is not seen[0]
    assert backend.log == []


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The middleware's own worker-thread calls on sessions (not the app's), in order."""
    seen: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(fn, "__self__", None), sa.orm.Session):
            seen.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr("sessionscope._session_calls.anyio.to_thread.run_sync", counting)
    return seen


async def test_an_unused_session_checks_out_no_connection_and_makes_no_thread_hop(
    backend: Backend, hops: list[str]
) -> None:
    during: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["state"]["db"]
        during.append(backend.checkedout())
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    await request(DBSessionMiddleware(app, engine=backend.engine))
    assert during == [0]
    assert hops == []


async def test_sync_sessions_commit_in_a_worker_thread_with_one_hop_per_phase(
    backend: Backend, hops: list[str]
) -> None:
    await request(json_app(backend, 200, write="t"))
    loop_thread = threading.current_thread().name
    (commit_thread,) = [t for e, t in backend.log if e == "COMMIT"]
    if backend.is_async:
        assert hops == []
    else:
        assert commit_thread != loop_thread
        assert hops == ["commit"]  # close after a commit holds no transaction: done inline


async def test_a_read_only_request_ends_without_a_hop_when_the_driver_holds_no_transaction(
    backend: Backend, hops: list[str]
) -> None:
    # sqlite3 begins a transaction at the first write only: after reads, ending the session's
    # transaction is in-memory work. psycopg begins one at the first statement: a real COMMIT.
    counted: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        counted.append(await backend.count(scope["state"]["db"]))
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    ex = await request(DBSessionMiddleware(app, engine=backend.engine), log=backend.log)
    assert ex.status == 200
    assert counted == [0]
    assert order(backend.log) == ["COMMIT", "start:200", "body"]
    if backend.id == "pg-sync":
        assert hops == ["commit"]
    else:
        assert hops == []  # sqlite-sync: inline; async sessions are awaited
    assert backend.checkedout() == 0


async def test_streaming_response_is_decided_at_start_and_the_session_stays_usable(
    backend: Backend,
) -> None:
    counts: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await backend.insert(session, "before")
        await send({"type": "http.response.start", "status": 200})
        for _ in range(2):
            counts.append(await backend.count(session))  # reads after the decision work
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    ex = await request(DBSessionMiddleware(app, engine=backend.engine), log=backend.log)
    ex.assert_well_formed()
    assert order(backend.log)[:2] == ["COMMIT", "start:200"]
    assert counts == [1, 1]
    assert backend.names() == ["before"]


async def test_writes_after_the_decision_are_rolled_back_and_reported_unless_committed(
    backend: Backend,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        # background work after the response: one committed explicitly, one not
        await backend.insert(session, "committed-late")
        await backend.run(session, lambda s: s.commit())
        await backend.insert(session, "forgotten-late")

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert backend.names() == ["committed-late"]
    late = [e for e in logs if e["event"] == "db_session.late_write"]
    assert len(late) == 1
    assert late[0]["log_level"] == "warning"


LATE_WRITES = {
    "comment": "/* tag */ INSERT INTO ss_items (name) VALUES ('forgotten-late')",
    "cte": "WITH i AS (INSERT INTO ss_items (name) VALUES ('forgotten-late') RETURNING id) "
    "SELECT id FROM i",
}


@pytest.mark.parametrize(
    ("backend", "statement"),
    [
        pytest.param(kind, statement, id=f"{kind}-{name}")
        for kind in BACKENDS
        for name, statement in LATE_WRITES.items()
        if not (kind.startswith("sqlite") and name == "cte")  # no data-modifying WITH there
    ],
    indirect=["backend"],
)
async def test_a_late_write_hidden_in_a_comment_or_a_cte_is_reported(
    backend: Backend, statement: str
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        await backend.run(session, lambda s: s.execute(sa.text(statement)))

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert backend.names() == []
    assert [e["event"] for e in logs if e["event"] == "db_session.late_write"] == [
        "db_session.late_write"
    ]
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [(e["outcome"], e["reason"]) for e in closed] == [("rollback", "late_write")]


async def test_a_request_that_saw_the_client_leave_before_its_response_rolls_back(
    backend: Backend,
) -> None:
    """Servers do not cancel the application when the client leaves (see the README's
    Limits); an application that was told so by ``receive()`` and answers anyway is rolled
    back."""
    from prometheus_client import CollectorRegistry

    from .metric_support import value

    incoming = [{"type": "http.request", "body": b"", "more_body": False}]
    incoming.append({"type": "http.disconnect"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await backend.insert(scope["state"]["db"], "abandoned")
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 201})
        await send({"type": "http.response.body", "body": b"created"})

    registry = CollectorRegistry()
    middleware = DBSessionMiddleware(app, engine=backend.engine, registry=registry)
    with capture_logs() as logs:
        await middleware(http_scope("/items", "POST"), receive, send)
    assert backend.names() == []
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert [(e["outcome"], e["reason"]) for e in closed] == [("rollback", "disconnected")]
    assert value(registry, "db_session_rollbacks_total", reason="disconnected") == 1
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_reads_after_the_decision_are_not_reported_as_late_writes(backend: Backend) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})
        await backend.count(session)

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert not [e for e in logs if e["event"] == "db_session.late_write"]


async def test_pending_orm_changes_left_after_the_decision_count_as_a_late_write(
    backend: Backend,
) -> None:
    class Item(sa.orm.DeclarativeBase):
        pass

    class Row(Item):
        __table__ = items

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = scope["state"]["db"]
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})
        session.add(Row(name="never-flushed"))

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
    assert [e["event"] for e in logs if e["event"] == "db_session.late_write"]
    assert backend.names() == []


async def test_cancellation_before_the_response_rolls_back_and_returns_the_connection(
    backend: Backend,
) -> None:
    inserted = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "cancelled")
        inserted.set()
        await anyio.sleep_forever()

    mw = DBSessionMiddleware(app, engine=backend.engine)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(request, mw)
            await inserted.wait()
            assert backend.checkedout() == 1
            tg.cancel_scope.cancel()
    assert backend.checkedout() == 0
    assert backend.names() == []
    closed = [e for e in logs if e["event"] == "db_session.closed"]
    assert closed[0]["outcome"] == "rollback"
    assert closed[0]["reason"] == "cancelled"


async def test_cleanup_after_cancellation_is_shielded_and_completes(backend: Backend) -> None:
    """A second cancellation while cleanup runs cannot stop it half-way."""
    inserted = anyio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "x")
        inserted.set()
        await anyio.sleep_forever()

    mw = DBSessionMiddleware(app, engine=backend.engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(request, mw)
        await inserted.wait()
        tg.cancel_scope.cancel()
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert backend.checkedout() == 0
    assert backend.names() == []


async def test_client_disconnect_during_the_body_read_rolls_back(backend: Backend) -> None:
    from starlette.requests import ClientDisconnect, Request

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "x")
        request_ = Request(scope, receive)
        async for _ in request_.stream():
            pass
        raise ClientDisconnect()

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing may be sent")

    from .support import http_scope

    with pytest.raises(ClientDisconnect):
        await DBSessionMiddleware(app, engine=backend.engine)(http_scope(), receive, send)
    assert backend.names() == []


async def test_use_after_close_raises_a_clear_error_and_takes_no_connection(
    backend: Backend,
) -> None:
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        kept.append(scope["state"]["db"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    with capture_logs() as logs:
        await request(DBSessionMiddleware(app, engine=backend.engine))
        with pytest.raises(SessionClosedError, match="session_scope"):
            await backend.count(kept[0])
    assert backend.checkedout() == 0
    warned = [e for e in logs if e["event"] == "db_session.use_after_close"]
    assert len(warned) == 1
    assert "support.py" in warned[0]["where"]  # the frame that used the closed session
    assert "/sqlalchemy/" not in warned[0]["where"]


async def test_non_http_scopes_pass_through_untouched(backend: Backend) -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(dict(scope))

    mw = DBSessionMiddleware(app, engine=backend.engine)
    for kind in ("websocket", "lifespan"):
        scope = {"type": kind, "path": "/ws", "state": {"k": 1}}
        await mw(scope, None, None)
        assert type(scope["state"]) is dict
    assert [s["type"] for s in seen] == ["websocket", "lifespan"]


async def test_excluded_paths_get_no_session(backend: Backend) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "db" not in scope["state"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    ex = await request(
        DBSessionMiddleware(app, engine=backend.engine, exclude_paths={"/metrics"}), "/metrics"
    )
    assert ex.status == 200


async def test_pool_is_back_to_baseline_after_a_request_that_never_responds(
    backend: Backend,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await backend.insert(scope["state"]["db"], "no-response")

    with capture_logs() as logs:
        ex = await request(DBSessionMiddleware(app, engine=backend.engine))
    assert ex.messages == []
    assert backend.names() == []
    assert [e["outcome"] for e in logs if e["event"] == "db_session.closed"] == ["rollback"]


async def test_values_the_app_sets_on_request_state_reach_the_outer_state(backend: Backend) -> None:
    from starlette.requests import Request

    outer_state: dict[str, Any] = {"from_lifespan": 1}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        req = Request(scope)
        assert req.state.from_lifespan == 1
        req.state.user = "alice"
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    from .support import http_scope

    scope = http_scope()
    scope["state"] = outer_state
    await request(DBSessionMiddleware(app, engine=backend.engine), scope=scope)
    assert outer_state == {"from_lifespan": 1, "user": "alice"}


def _unused(ex: Exchange) -> None:  # keep the import used for type checkers
    del ex
