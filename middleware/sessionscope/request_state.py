"""``scope["state"]`` for one request: request sessions are created on first access.

``request.state.db`` reads ``scope["state"]["db"]``. To create the session only when a route
asks for it, the middleware replaces ``scope["state"]`` with a :class:`RequestState`: a copy of
the incoming state whose missing keys may be provided by a session factory. Values the
application sets are written through to the original dict as well, so an outer middleware
holding the original still sees them; the sessions themselves stay in the copy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import SessionNotAvailableError


class RequestState(dict[str, Any]):
    """A request's state dict that creates registered values on first access."""

    __slots__ = ("_factories", "_openers", "_origin", "databases", "names")

    def __init__(self, origin: MutableMapping[str, Any] | None) -> None:
        super().__init__(origin or ())
        self._origin = origin
        self._factories: dict[str, Callable[[], Any]] = {}
        self._openers: dict[str, Callable[[], Awaitable[Any]]] = {}
        self.names: dict[str, str] = {}
        """Database name -> state key, for every middleware that handles this request."""
        self.databases: dict[str, Any] = {}
        """Database name -> its middleware's ``SessionSettings``, while the request runs."""

    @classmethod
    def of(cls, scope: MutableMapping[str, Any]) -> RequestState:
        """The scope's ``RequestState``, installing one if the scope has a plain dict."""
        state = scope.get("state")
        if type(state) is cls:
            return state
        installed = cls(state)
        scope["state"] = installed
        return installed

    def provide(
        self,
        name: str,
        key: str,
        factory: Callable[[], Any],
        opener: Callable[[], Awaitable[Any]],
        settings: Any = None,
    ) -> bool:
        """Serve ``key`` from ``factory`` on first access; ``False`` if ``key`` is taken.

        ``opener`` is the awaitable way to the same value, for callers on the event loop.
        """
        if key in self._factories or dict.__contains__(self, key):
            return False
        self._factories[key] = factory
        self._openers[key] = opener
        self.names[name] = key
        if settings is not None:
            self.databases[name] = settings
        return True

    def resolve(self, name: str | None, *, asked_by: str) -> str:
        """The database name meant by ``name``: itself, else the only one, else ``default``."""
        if not self.names:
            raise SessionNotAvailableError(
                f"{asked_by}: no DBSessionMiddleware handles this request; add it with "
                "app.add_middleware(DBSessionMiddleware, engine=...) or remove the path from "
                "its exclude_paths."
            )
        wanted = name
        if wanted is None:
            wanted = next(iter(self.names)) if len(self.names) == 1 else "default"
        if wanted not in self.names:
            raise SessionNotAvailableError(
                f"{asked_by}: no DBSessionMiddleware named {wanted!r}; this request has "
                f"{sorted(self.names)}. Pass name=."
            )
        return wanted

    def withdraw(self, name: str, key: str, factory: Callable[[], Any]) -> None:
        """After the request: later first accesses of ``key`` go to ``factory`` instead."""
        self._factories[key] = factory
        self._openers.pop(key, None)
        self.databases.pop(name, None)

    async def open(self, key: str) -> Any:
        """The value of ``key``, created through its awaitable opener if not created yet."""
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        opener = self._openers.get(key)
        if opener is None:
            return self[key]
        return await opener()

    def __missing__(self, key: str) -> Any:
        factory = self._factories.get(key)
        if factory is None:
            raise KeyError(key)
        return factory()

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._factories

    def remember(self, key: str, value: Any) -> None:
        """Store a created value in this request's state only (never in the origin)."""
        dict.__setitem__(self, key, value)

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        if self._origin is not None:
            self._origin[key] = value

    def __delitem__(self, key: str) -> None:
        dict.__delitem__(self, key)
        if self._origin is not None and key in self._origin:
            del self._origin[key]
