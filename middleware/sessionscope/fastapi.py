"""FastAPI dependencies for the request session (needs the ``sessionscope[fastapi]`` extra).

``DBSession`` and ``AsyncDBSession`` are ``Annotated`` types: a route parameter declared with
one receives the very object at ``request.state.<state_key>``. Their dependencies are
``get_db`` and ``get_async_db``, which tests can replace with FastAPI's
``app.dependency_overrides[get_db] = ...``. ``get_session(name)`` returns a new dependency for
a database added with ``DBSessionMiddleware(..., name=name)``: create it once and use that
object in routes and overrides alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Final

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from .errors import SessionNotAvailableError
from .request_state import RequestState

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
                f"{'AsyncDBSession' if isinstance(session, AsyncSession) else 'DBSession'}."
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

get_async_db: Final = get_session(kind=AsyncSession)
"""The dependency behind ``AsyncDBSession``: the request's ``AsyncSession``."""

DBSession = Annotated[Session, _request_scoped(get_db)]
"""A route parameter that receives the request's sync ``Session``."""

AsyncDBSession = Annotated[AsyncSession, _request_scoped(get_async_db)]
"""A route parameter that receives the request's ``AsyncSession``."""

__all__ = ["AsyncDBSession", "DBSession", "get_async_db", "get_db", "get_session"]
