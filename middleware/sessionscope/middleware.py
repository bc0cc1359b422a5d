"""``DBSessionMiddleware``: one SQLAlchemy session per HTTP request, decided before the status."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import sessionmaker
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _statements as statements
from ._leaks import LeakRegistry
from ._lifecycle import RequestSession, SessionSettings, install_session_listeners
from ._metrics import DEFAULT_MAX_ROUTES, Metrics
from ._options import OWNER, MiddlewareOptions
from ._otel import SessionSpans
from ._policy import CommitPolicy, commit_below_400
from ._pool import instrument_pool
from ._reporting import Reporter
from ._request_context import RouteLabels
from ._request_state import RequestState
from ._session_calls import SessionCalls
from ._slots import SessionSlots
from ._source import SessionSource
from ._statements import CURRENT
from .catalogue import DEFAULT_NAMESPACE
from .errors import ConfigurationError, MiddlewareOrderWarning, concurrent_use

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

_OWNER = OWNER
_HOLDER_WORDS = ("gzip", "brotli", "zstd", "compress")
"""Class-name words of middlewares that hold the response start (compression)."""


class DBSessionMiddleware:
    """Give every HTTP request its own SQLAlchemy session at ``request.state.<state_key>``.

    The session is created the first time the request asks for it and holds no connection
    until it runs a statement. When the application sends ``http.response.start`` and before
    that message is forwarded, ``commit_on(status)`` decides: commit, or roll back. A commit
    that fails is rolled back and the client gets a complete ``500`` instead. An exception or
    a cancellation before the response started rolls back. The session is closed when the
    application returns; cleanup cannot be interrupted by cancellation.

    Args:
        app: the ASGI application to wrap.
        engine: a sync ``Engine`` (requests get ``Session``) or an ``AsyncEngine``
            (requests get ``AsyncSession``).
        sessionmaker: a ``sessionmaker`` to create sessions with, instead of ``engine``.
        async_sessionmaker: an ``async_sessionmaker``, instead of ``engine``.
        name: the database's name, for ``get_session(name)``, logs and metrics.
        state_key: the attribute of ``request.state`` the session is found at.
        commit_on: which final statuses commit (default: below 400).
        exclude_paths: exact paths that get no session at all (``/metrics``, ``/healthz``).
        metrics: export Prometheus metrics (see the README's metric list).
        registry: the ``CollectorRegistry`` to register them on (default: the global one).
        namespace: the metric name prefix (``db`` gives ``db_sessions_open``).
        max_routes: distinct ``route`` label values before new routes count as ``__other__``.
        leak_threshold: seconds after which an open session is reported as a suspected leak;
            ``None`` turns leak detection off.
        leak_exempt_routes: route templates whose sessions may stay open (streaming exports,
            server-sent events); never reported as leaks.
        closed_log_level: level of the one ``db_session.closed`` event per session
            (``"debug"``, ``"info"``, ``"warning"``, ``"error"``), or ``None`` for none.
        replica_engine: a read replica: requests whose method is in ``read_only_methods``
            get their session from it, and any write they attempt raises
            ``ReadOnlyRequestError``.
        read_only_methods: the methods routed to ``replica_engine``.
        tracer_provider: the OpenTelemetry ``TracerProvider`` for ``db.session`` spans
            (default: the global one; no spans when none is configured).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: Engine | AsyncEngine | None = None,
        sessionmaker: sessionmaker[Any] | None = None,
        async_sessionmaker: async_sessionmaker[Any] | None = None,
        name: str = "default",
        state_key: str = "db",
        commit_on: CommitPolicy = commit_below_400,
        exclude_paths: Iterable[str] = (),
        metrics: bool = True,
        registry: CollectorRegistry | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        max_routes: int = DEFAULT_MAX_ROUTES,
        leak_threshold: float | None = 60.0,
        leak_exempt_routes: Iterable[str] = (),
        closed_log_level: str | None = "debug",
        replica_engine: Engine | AsyncEngine | None = None,
        read_only_methods: Iterable[str] = ("GET", "HEAD"),
        tracer_provider: Any = None,
    ) -> None:
        o = MiddlewareOptions(
            engine=engine,
            sessionmaker=sessionmaker,
            async_sessionmaker=async_sessionmaker,
            name=name,
            state_key=state_key,
            commit_on=commit_on,
            exclude_paths=exclude_paths,
            metrics=metrics,
            registry=registry,
            namespace=namespace,
            max_routes=max_routes,
            leak_threshold=leak_threshold,
            leak_exempt_routes=leak_exempt_routes,
            closed_log_level=closed_log_level,
            replica_engine=replica_engine,
            read_only_methods=read_only_methods,
            tracer_provider=tracer_provider,
        )
        source, replica = o.source, o.replica
        _refuse_duplicates(app, name=o.name, state_key=o.state_key)
        _warn_of_start_holders(app)
        self.app = app
        self.options = o
        self.name = o.name
        self.state_key = o.state_key
        self.exclude_paths = o.excluded
        db_metrics = (
            Metrics.on(o.registry, o.namespace).for_db(o.name, max_routes=o.max_routes)
            if o.metrics
            else None
        )
        reporter = Reporter(name=o.name, closed_level=o.closed_log_level, metrics=db_metrics)
        reporter.spans = SessionSpans.create(o.tracer_provider)
        reporter.routes = RouteLabels(app)
        if o.leak_threshold is not None:
            reporter.leaks = LeakRegistry(
                threshold=float(o.leak_threshold),
                exempt_routes=o.leak_exempt,
                on_suspect=reporter.leak_suspected,
                on_sweep=reporter.swept,
                route_of=reporter.routes.label,
            )
        if db_metrics is not None:
            db_metrics.leak_threshold.set(o.leak_threshold or 0)
            if source.engine is not None:
                reporter.pool = instrument_pool(source.engine, db_metrics.metrics, o.name)
            if replica is not None and replica.engine is not None:
                instrument_pool(replica.engine, db_metrics.metrics, f"{o.name}_replica")
        self.settings = SessionSettings(
            name=o.name,
            state_key=o.state_key,
            source=source,
            commit_on=o.commit_on,
            calls=SessionCalls(is_async=source.is_async, name=o.name),
            reporter=reporter,
            create_lock=threading.Lock(),
            slots=_slots(source, o.name),
            replica=replica,
            replica_slots=None if replica is None else _slots(replica, f"{o.name}_replica"),
            read_only_methods=o.read_only,
            gated=_runs_app_in_own_task(app),
        )
        install_session_listeners()
        for each in (source, replica):
            if each is not None and each.engine is not None:
                statements.install(each.engine)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exclude_paths:
            await self.app(scope, receive, send)
            return
        rs = RequestSession(self.settings, scope, send, receive)
        state = RequestState.serve(scope, self.name, self.state_key, rs)
        if state is None:
            raise ConfigurationError(
                f"{_OWNER}(name={self.name!r}): request.state.{self.state_key} is already "
                "taken (by another DBSessionMiddleware, e.g. one around the app this one is "
                "mounted in, or by the lifespan state); give each database its own state_key "
                "and add its middleware once, to the outermost application."
            )
        rs.state = state
        # The request's statements count into rs (inline: this runs for every request).
        parent = CURRENT.get()
        if parent is not None:
            rs.parent = parent
        token = CURRENT.set(rs)
        try:
            await self.app(scope, rs.receive, rs.send)
        except PoolTimeoutError as exc:
            if rs.started:
                await rs.finish(exc)
                raise
            rs.unavailable(exc)
            await rs.finish(exc)
            await rs.respond_unavailable()
        except BaseException as exc:
            timeout = None if rs.started else _only_pool_timeouts(exc)
            if timeout is not None:  # e.g. from gather_with_sessions' task group
                rs.unavailable(timeout)
                await rs.finish(timeout)
                await rs.respond_unavailable()
                return
            await rs.finish(exc)
            clear = None if rs.session is None else concurrent_use(exc)
            if clear is not None:
                raise clear from exc
            raise
        else:
            if not rs.withdraw():  # inline for the many requests that never open their session
                await rs.close(None)
        finally:
            CURRENT.reset(token)


def _only_pool_timeouts(exc: BaseException) -> PoolTimeoutError | None:
    """The first pool timeout of an exception group made of nothing else, else ``None``."""
    if not isinstance(exc, BaseExceptionGroup):
        return None
    first: PoolTimeoutError | None = None
    for inner in exc.exceptions:
        found = inner if isinstance(inner, PoolTimeoutError) else _only_pool_timeouts(inner)
        if found is None:
            return None
        first = first or found
    return first


def _slots(source: SessionSource, name: str) -> SessionSlots | None:
    if source.engine is None or source.is_async:
        return None
    return SessionSlots.for_engine(source.engine, name)


def _inner_apps(app: ASGIApp) -> Iterator[Any]:
    """``app`` and the applications it wraps, through their ``app`` attributes."""
    inner: Any = app
    for _ in range(64):
        yield inner
        inner = getattr(inner, "app", None)
        if inner is None:
            return


def _runs_app_in_own_task(app: ASGIApp) -> bool:
    """Whether a ``BaseHTTPMiddleware`` (``@app.middleware("http")``) is inside: it runs the
    application in a task of its own, so its body runs on while the decision is made."""
    return any(isinstance(inner, BaseHTTPMiddleware) for inner in _inner_apps(app))


def _warn_of_start_holders(app: ASGIApp) -> None:
    """Warn of a middleware inside that holds the response start until the first body chunk
    (``GZipMiddleware``, other compression middlewares by name): the decision would wait for
    that chunk, and what a streaming body does before it would be committed with the request."""
    for inner in _inner_apps(app):
        kind = type(inner).__name__
        if isinstance(inner, GZipMiddleware) or any(w in kind.lower() for w in _HOLDER_WORDS):
            warnings.warn(
                f"{kind} is inside {_OWNER}: it holds the response start until the first "
                "body chunk, so the commit decision waits for that chunk and what a streaming "
                f"body does before its first chunk is committed with the request. Add {kind} "
                f"after {_OWNER} (app.add_middleware({kind}) last) so that it wraps it.",
                MiddlewareOrderWarning,
                stacklevel=3,
            )
            return


def _refuse_duplicates(app: ASGIApp, *, name: str, state_key: str) -> None:
    """Fail when a DBSessionMiddleware further in, or in a mounted application (built or
    still only declared with ``add_middleware``), uses the same name or state key."""
    pending: list[Any] = [app]
    seen: set[int] = set()
    while pending and len(seen) < 1024:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        declared = [
            (m.kwargs.get("name", "default"), m.kwargs.get("state_key", "db"))
            for m in getattr(node, "user_middleware", None) or ()
            if getattr(m, "cls", None) is DBSessionMiddleware
        ]
        if isinstance(node, DBSessionMiddleware):
            declared.append((node.name, node.state_key))
        for their_name, their_key in declared:
            for label, mine, theirs in (
                ("state_key", state_key, their_key),
                ("name", name, their_name),
            ):
                if mine == theirs:
                    raise ConfigurationError(
                        f"{_OWNER} was added twice with {label}={mine!r} (inside this one or "
                        "in a mounted application); each database needs its own name and "
                        "state_key, e.g. add_middleware(DBSessionMiddleware, engine=replica, "
                        "name='replica', state_key='replica_db'), and its middleware is added "
                        "once, to the outermost application."
                    )
        pending.append(getattr(node, "middleware_stack", None))
        pending.append(getattr(node, "app", None))
        pending.extend(getattr(route, "app", None) for route in getattr(node, "routes", None) or ())
