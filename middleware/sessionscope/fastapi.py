"""FastAPI dependencies for the request session (needs the ``sessionscope[fastapi]`` extra).

``DBSession`` and ``AsyncDBSession`` are ``Annotated`` types: a route parameter declared with
one receives the very object at ``request.state.<state_key>``. ``get_session(name)`` returns
the dependency for a database added with ``DBSessionMiddleware(..., name=name)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

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


DBSession = Annotated[Session, _request_scoped(get_session(kind=Session))]
"""A route parameter that receives the request's sync ``Session``."""

if TYPE_CHECKING:
    AsyncDBSession = Annotated[AsyncSession, _request_scoped(get_session(kind=AsyncSession))]
    """A route parameter that receives the request's ``AsyncSession``."""
else:

    def __getattr__(name: str) -> Any:
        # AsyncDBSession is built on first import: SQLAlchemy's asyncio extension needs
        # greenlet, which a sync application does not have to install.
        if name == "AsyncDBSession":
            return _async_db_session()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _async_db_session() -> Any:
    error = asyncio_missing()
    if error is not None:
        raise ImportError(
            "sessionscope.fastapi.AsyncDBSession needs SQLAlchemy's asyncio support, which "
            f"needs the greenlet library ({error}). Install it with: {INSTALL_ASYNCIO}"
        ) from error
    from sqlalchemy.ext.asyncio import AsyncSession

    return Annotated[AsyncSession, _request_scoped(get_session(kind=AsyncSession))]


__all__ = ["AsyncDBSession", "DBSession", "get_session"]
