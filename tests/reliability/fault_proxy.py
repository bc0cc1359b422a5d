"""A fault-injecting TCP proxy between the application and PostgreSQL, for reliability tests.

The proxy listens on ``127.0.0.1`` (an ephemeral port) and forwards every byte to the
upstream server. It runs its own event loop in a daemon thread, so it keeps forwarding while
the test's event loop (or a worker thread of a sync engine) is blocked. Faults, set from any
thread:

* :meth:`FaultProxy.cut` closes every open connection at once (with a TCP reset), as a
  failover or a network blip does;
* :meth:`FaultProxy.refuse` stops listening, so new connections are refused
  (``ECONNREFUSED``) until :meth:`FaultProxy.heal`;
* :meth:`FaultProxy.add_latency` delays every chunk forwarded, in both directions;
* :meth:`FaultProxy.stall` stops forwarding (connections stay open, bytes are held) until
  :meth:`FaultProxy.heal` or :meth:`FaultProxy.cut`: a query that hangs mid-flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_CHUNK = 65536


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``, with faults injected on demand."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.latency = 0.0
        self.connections_accepted = 0
        self.connections_cut = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._started = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._started.wait(5)
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        return self._call(self._cut())

    def refuse(self) -> None:
        """Stop listening: new connections are refused until :meth:`heal`."""
        self._call(self._unlisten())

    def add_latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds`` (0 removes the latency)."""
        self.latency = seconds

    def stall(self) -> None:
        """Hold every byte in flight: open connections hang until :meth:`heal` or :meth:`cut`."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def heal(self) -> None:
        """Listen again, forward again, no latency."""
        self.latency = 0.0
        self._loop.call_soon_threadsafe(self._flowing.set)
        self._call(self._listen())

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- internals -------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._flowing.set)
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port or None, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # the listening socket closes now; open links stay

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self.connections_cut += len(links)
        return len(links)

    async def _shutdown(self) -> None:
        await self._unlisten()
        await self._cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            async with asyncio.TaskGroup() as tg:
                link.tasks = [
                    tg.create_task(self._pump(reader, up_writer, link)),
                    tg.create_task(self._pump(up_reader, writer, link)),
                ]
        except* OSError:  # a pump whose peer was reset; the link is closed either way
            pass
        finally:
            self._links.discard(link)
            link.reset()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        while True:
            data = await source.read(_CHUNK)
            if not data:
                link.reset()
                return
            if self.latency:
                await asyncio.sleep(self.latency)
            await self._flowing.wait()
            if link.closed:
                return
            sink.write(data)
            await sink.drain()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        _reset(self.client)
        _reset(self.upstream)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection die, not a clean FIN."""
    sock: socket.socket | None = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
