"""FastAPI dependencies for the request session (needs the ``sessionscope[fastapi]`` extra).

``DBSession`` and ``AsyncDBSession`` are ``Annotated`` types: a route parameter declared with
one receives the very object at ``request.state.<state_key>``. Their dependencies are
``get_db`` and ``get_async_db``, which tests can replace with FastAPI's
``app.dependency_overrides[get_db] = ...``. ``get_session(name)`` returns a new dependency for
a database added with ``DBSessionMiddleware(..., name=name)``: create it once and use that
object in routes and overrides alike.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import Depends
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from ._request_state import RequestState
from ._source import INSTALL_ASYNCIO, asyncio_missing, is_async_session
from .errors import SessionNotAvailableError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

SessionDependency = Callable[[HTTPConnection], Coroutine[Any, Any, Any]]


def get_session(name: str | None = None, *, kind: type[Any] | None = None) -> SessionDependency:
    """The dependency that returns the request session of database ``name``.

    With ``name=None``: the only database, or the one named ``"default"``. ``kind``
    (``Session`` or ``AsyncSession``) makes a mismatch a clear error instead of a confusing one
    at the first query. The dependency is a coroutine function so that FastAPI calls it on the
    event loop: it costs no threadpool hop.
    """

    async def request_session(request: HTTPConnection) -> Any:
        scope = request.scope
        state = scope.get("state")
        if not isinstance(state, RequestState):
            state = RequestState(None)  # no middleware ran: resolve() says what to do
        names = state.names
        if name is None and len(names) == 1:  # the common case, without building messages
            wanted = next(iter(names))
        else:
            wanted = state.resolve(name, asked_by=f"the route {scope.get('path')!r}")
        session = await state.open(names[wanted])
        if kind is not None and not isinstance(session, kind):
            raise SessionNotAvailableError(
                f"the route asks for a {kind.__name__} but database {wanted!r} gives "
                f"{type(session).__name__}; use "
                f"{'AsyncDBSession' if is_async_session(session) else 'DBSession'}."
            )
        return session

    return request_session


def _request_scoped(dependency: SessionDependency) -> Any:
    """``Depends(dependency, scope="request")`` where FastAPI takes a scope (>= 0.121).

    The session lives until the response has been sent: a request-scoped dependency. Saying so
    also spares FastAPI two look-ups a request that would work the scope out (about 9,000
    instructions, an eighth of what solving the dependency costs it).
    """
    if "scope" in inspect.signature(Depends).parameters:
        return Depends(dependency, scope="request")
    return Depends(dependency)


get_db: Final = get_session(kind=Session)
"""The dependency behind ``DBSession``: the request's sync ``Session`` (the key to use in
``app.dependency_overrides``)."""

DBSession = Annotated[Session, _request_scoped(get_db)]
"""A route parameter that receives the request's sync ``Session``."""

if TYPE_CHECKING:
    get_async_db: Final = get_session(kind=AsyncSession)
    """The dependency behind ``AsyncDBSession``: the request's ``AsyncSession`` (the key to
    use in ``app.dependency_overrides``)."""

    AsyncDBSession = Annotated[AsyncSession, _request_scoped(get_async_db)]
    """A route parameter that receives the request's ``AsyncSession``."""
else:

    def __getattr__(name: str) -> Any:
        # The async names are built on first import: SQLAlchemy's asyncio extension needs
        # greenlet, which a sync application does not have to install.
        if name == "get_async_db":
            return _async_names()[0]
        if name == "AsyncDBSession":
            return _async_names()[1]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _async_names() -> tuple[SessionDependency, Any]:
    """``get_async_db`` and ``AsyncDBSession``, built once: the same objects at every import,
    so that ``dependency_overrides[get_async_db]`` replaces the dependency routes use."""
    error = asyncio_missing()
    if error is not None:
        raise ImportError(
            "sessionscope.fastapi.AsyncDBSession needs SQLAlchemy's asyncio support, which "
            f"needs the greenlet library ({error}). Install it with: {INSTALL_ASYNCIO}"
        ) from error
    from sqlalchemy.ext.asyncio import AsyncSession

    dependency = get_session(kind=AsyncSession)
    return dependency, Annotated[AsyncSession, _request_scoped(dependency)]


__all__ = ["AsyncDBSession", "DBSession", "get_async_db", "get_db", "get_session"]
