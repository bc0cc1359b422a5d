"""An in-process ASGI driver: calls the app directly, no server, no sockets.

:class:`AsgiDriver` runs the app's lifespan, then sends requests one at a time and returns the
response status. The scope is what a server would build for ``HTTP/1.1`` on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CLIENT = ("127.0.0.1", 50000)
_SERVER = ("127.0.0.1", 8000)
_HEADERS = [(b"host", b"testserver"), (b"user-agent", b"bench")]
_POST_HEADERS = [*_HEADERS, (b"content-length", b"0")]


class AsgiDriver:
    """Drives one ASGI app: ``await start()``, ``await request(...)``, ``await stop()``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._state: dict[str, Any] = {}
        self._lifespan: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> None:
        """Run the lifespan startup (apps without lifespan support are fine)."""
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self._state}
        self._lifespan = asyncio.create_task(
            self.app(scope, self._to_app.get, self._from_app.put)  # type: ignore[arg-type]
        )
        await self._to_app.put({"type": "lifespan.startup"})
        reply = asyncio.create_task(self._from_app.get())
        done, _ = await asyncio.wait({reply, self._lifespan}, return_when=asyncio.FIRST_COMPLETED)
        if reply not in done:
            reply.cancel()
            self._lifespan = None  # the app does not do lifespan
            return
        message = reply.result()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"lifespan startup failed: {message}")

    async def stop(self) -> None:
        """Run the lifespan shutdown."""
        if self._lifespan is None:
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()
        await self._lifespan
        self._lifespan = None

    async def request(self, method: str, path: str) -> int:
        """Send one request with an empty body; the response status."""
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": _HEADERS if method == "GET" else _POST_HEADERS,
            "client": _CLIENT,
            "server": _SERVER,
            "state": self._state.copy(),
        }
        body_sent = False
        status = 0

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status
