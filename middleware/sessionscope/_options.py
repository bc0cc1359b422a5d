"""The middleware's options: every one validated once, in one frozen object.

``DBSessionMiddleware.__init__`` keeps its explicit keyword-only signature (what users and type
checkers see), builds :class:`MiddlewareOptions` from it first, and then only wires things. A
wrong option raises :class:`~sessionscope.errors.ConfigurationError` here, before anything is
built or registered.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._metrics import DEFAULT_MAX_ROUTES
from ._policy import CommitPolicy, commit_below_400
from ._reporting import LEVELS
from ._source import (
    SessionSource,
    refuse_connection_per_thread,
    replica_source,
    resolve_source,
)
from .catalogue import DEFAULT_NAMESPACE
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
    from sqlalchemy.orm import sessionmaker

OWNER: Final = "DBSessionMiddleware"
"""Who the messages of a wrong option name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MiddlewareOptions:
    """The options of one ``DBSessionMiddleware``, validated (see its docstring for each)."""

    engine: Engine | AsyncEngine | None = None
    sessionmaker: sessionmaker[Any] | None = None
    async_sessionmaker: async_sessionmaker[Any] | None = None
    name: str = "default"
    state_key: str = "db"
    commit_on: CommitPolicy = commit_below_400
    exclude_paths: Iterable[str] = ()
    metrics: bool = True
    registry: CollectorRegistry | None = None
    namespace: str = DEFAULT_NAMESPACE
    max_routes: int = DEFAULT_MAX_ROUTES
    leak_threshold: float | None = 60.0
    leak_exempt_routes: Iterable[str] = ()
    closed_log_level: str | None = "debug"
    replica_engine: Engine | AsyncEngine | None = None
    read_only_methods: Iterable[str] = ("GET", "HEAD")
    tracer_provider: Any = None

    source: SessionSource = field(init=False)
    """Where sessions come from (``engine``, ``sessionmaker`` or ``async_sessionmaker``)."""
    replica: SessionSource | None = field(init=False)
    """Where read-only requests' sessions come from (``replica_engine``), if anywhere."""
    excluded: frozenset[str] = field(init=False)
    """``exclude_paths`` as a set."""
    leak_exempt: frozenset[str] = field(init=False)
    """``leak_exempt_routes`` as a set."""
    read_only: frozenset[str] = field(init=False)
    """``read_only_methods``, upper case, as a set."""

    def __post_init__(self) -> None:
        source = resolve_source(
            engine=self.engine,
            sessionmaker_=self.sessionmaker,
            async_sessionmaker_=self.async_sessionmaker,
            owner=OWNER,
        )
        given = (
            "engine"
            if self.engine is not None
            else "sessionmaker"
            if self.sessionmaker is not None
            else "async_sessionmaker"
        )
        refuse_connection_per_thread(source, option=given, owner=OWNER)
        commit_on = self.commit_on
        if not callable(commit_on):
            raise ConfigurationError(
                f"{OWNER}: commit_on must be a function of the status code returning True to "
                f"commit (e.g. `lambda status: status < 400`), not {commit_on!r}."
            )
        for label, value in (("name", self.name), ("state_key", self.state_key)):
            if not isinstance(value, str) or not value.isidentifier():
                raise ConfigurationError(
                    f"{OWNER}: {label} must be a Python identifier, got {value!r}."
                )
        exclude_paths = self.exclude_paths
        if isinstance(exclude_paths, str):
            raise ConfigurationError(
                f"{OWNER}: exclude_paths must be a collection of paths, "
                f"e.g. ({exclude_paths!r},), not a single string."
            )
        excluded = frozenset(exclude_paths)
        if not all(isinstance(p, str) and p.startswith("/") for p in excluded):
            raise ConfigurationError(
                f"{OWNER}: exclude_paths must be exact paths starting with '/', "
                f"got {sorted(map(repr, excluded))}."
            )
        closed_log_level = self.closed_log_level
        if closed_log_level is not None and closed_log_level not in LEVELS:
            raise ConfigurationError(
                f"{OWNER}: closed_log_level must be one of {sorted(LEVELS)} or None, "
                f"got {closed_log_level!r}."
            )
        leak_threshold = self.leak_threshold
        if leak_threshold is not None and not (
            isinstance(leak_threshold, int | float) and leak_threshold > 0
        ):
            raise ConfigurationError(
                f"{OWNER}: leak_threshold must be a positive number of seconds or None "
                f"(detection off), got {leak_threshold!r}."
            )
        leak_exempt_routes = self.leak_exempt_routes
        if isinstance(leak_exempt_routes, str):
            raise ConfigurationError(
                f"{OWNER}: leak_exempt_routes must be a collection of route templates, "
                f"e.g. ({leak_exempt_routes!r},), not a single string."
            )
        max_routes = self.max_routes
        if not isinstance(max_routes, int) or max_routes < 1:
            raise ConfigurationError(
                f"{OWNER}: max_routes must be a positive integer, got {max_routes!r}."
            )
        read_only_methods = self.read_only_methods
        if isinstance(read_only_methods, str):
            raise ConfigurationError(
                f"{OWNER}: read_only_methods must be a collection of HTTP methods, "
                f"e.g. ({read_only_methods!r},), not a single string."
            )
        replica = (
            None
            if self.replica_engine is None
            else replica_source(source, self.replica_engine, owner=OWNER)
        )
        if replica is not None:
            refuse_connection_per_thread(replica, option="replica_engine", owner=OWNER)
        # A frozen dataclass sets its derived fields through object.__setattr__.
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "replica", replica)
        object.__setattr__(self, "excluded", excluded)
        object.__setattr__(self, "leak_exempt", frozenset(leak_exempt_routes))
        object.__setattr__(self, "read_only", frozenset(m.upper() for m in read_only_methods))
