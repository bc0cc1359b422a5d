"""``scope["state"]`` for one request: request sessions are created on first access.

``request.state.db`` reads ``scope["state"]["db"]``. To create the session only when a route
asks for it, the middleware replaces ``scope["state"]`` with a :class:`RequestState`: a copy of
the incoming state whose missing keys may be provided by a session factory. Values the
application sets are written through to the original dict as well, so an outer middleware
holding the original still sees them; the sessions themselves stay in the copy.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Protocol

from .errors import SessionNotAvailableError


class Provider(Protocol):
    """Creates a value of the request state on first access (the request's session)."""

    def open(self) -> Any:
        """The value, created now if need be (from any thread)."""

    async def open_async(self) -> Any:
        """The value, created now if need be, waiting on the event loop where it must."""


class RequestState(dict[str, Any]):
    """A request's state dict that creates registered values on first access."""

    __slots__ = ("_origin", "_providers", "databases", "names")

    def __init__(self, origin: MutableMapping[str, Any] | None) -> None:
        if origin:
            super().__init__(origin)
        self._origin = origin
        self._providers: dict[str, Provider] = {}
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

    def provide(self, name: str, key: str, provider: Provider, settings: Any = None) -> bool:
        """Serve ``key`` from ``provider`` on first access; ``False`` if ``key`` is taken."""
        if key in self._providers or dict.__contains__(self, key):
            return False
        self._providers[key] = provider
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

    def withdraw(self, name: str, key: str, provider: Provider) -> None:
        """After the request: later first accesses of ``key`` go to ``provider`` instead."""
        self._providers[key] = provider
        self.databases.pop(name, None)

    async def open(self, key: str) -> Any:
        """The value of ``key``, created through its provider's awaitable way if not yet."""
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        provider = self._providers.get(key)
        if provider is None:
            return self[key]
        return await provider.open_async()

    def __missing__(self, key: str) -> Any:
        provider = self._providers.get(key)
        if provider is None:
            raise KeyError(key)
        return provider.open()

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self._providers

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
