"""``scope["state"]`` for one request: request sessions are created on first access.

``request.state.db`` reads ``scope["state"]["db"]``. To create the session only when a route
asks for it, the middleware replaces ``scope["state"]`` with a :class:`RequestState`: a copy of
the incoming state whose missing keys may be provided by a session factory. Values the
application sets are written through to the original dict as well, so an outer middleware
holding the original still sees them; the sessions themselves stay in the copy.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, NoReturn, Protocol

from .errors import SessionNotAvailableError


class Provider(Protocol):
    """Creates a value of the request state on first access (the request's session)."""

    settings: Any
    """What the provider's middleware shares between requests (its ``SessionSettings``)."""

    def open(self) -> Any:
        """The value, created now if need be (from any thread)."""

    async def open_async(self) -> Any:
        """The value, created now if need be, waiting on the event loop where it must."""


class Refuser(Protocol):
    """Says why a withdrawn value is no longer available."""

    def refuse(self, matched: object) -> NoReturn:
        """Raise the error for a first access after the request, on route object ``matched``."""


Withdrawn = tuple[Refuser, object]
"""A withdrawn provider: who refuses, and the matched route object it refuses for. A plain
tuple: built on every request that never opens its session, it must cost next to nothing."""


class RequestState(dict[str, Any]):
    """A request's state dict that creates registered values on first access."""

    __slots__ = ("_origin", "_providers", "names")

    def __init__(self, origin: MutableMapping[str, Any] | None) -> None:
        if origin:
            dict.update(self, origin)
        self._origin = origin
        self._providers: dict[str, Provider | Withdrawn] = {}
        self.names: dict[str, str] = {}
        """Database name -> state key, for every middleware that handles this request."""

    @classmethod
    def serve(
        cls, scope: MutableMapping[str, Any], name: str, key: str, provider: Provider
    ) -> RequestState | None:
        """Serve ``key`` of the scope's state from ``provider`` on first access, installing a
        ``RequestState`` if the scope has a plain dict; ``None`` if ``key`` is taken."""
        state = scope.get("state")
        if type(state) is not cls:
            state = scope["state"] = cls(state)
        if key in state._providers or dict.__contains__(state, key):
            return None
        state._providers[key] = provider
        state.names[name] = key
        return state

    def settings(self, name: str) -> Any:
        """The settings of database ``name``'s provider while the request runs, else ``None``."""
        provider = self._providers.get(self.names.get(name, ""))
        if provider is None or isinstance(provider, tuple):
            return None
        return provider.settings

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

    def withdraw(self, key: str, refuser: Refuser, matched: object) -> None:
        """After the request: later first accesses of ``key`` raise ``refuser``'s error."""
        self._providers[key] = (refuser, matched)

    async def open(self, key: str) -> Any:
        """The value of ``key``, created through its provider's awaitable way if not yet."""
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        provider = self._providers.get(key)
        if provider is None or isinstance(provider, tuple):
            return self[key]  # __missing__ raises: not provided, or withdrawn
        return await provider.open_async()

    def __missing__(self, key: str) -> Any:
        provider = self._providers.get(key)
        if provider is None:
            raise KeyError(key)
        if isinstance(provider, tuple):
            provider[0].refuse(provider[1])
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
