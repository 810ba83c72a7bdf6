"""A TCP proxy the test controls: a network partition between one replica and a server.

`cut()` is a partition, not a crash: nothing crosses in either direction, open
connections stay open (whatever was sent waits, as in a router's queue or TCP's
retransmissions), and a new connection is accepted but never reaches the server, so
the client's own timeouts are what it meets. `heal()` lets everything through again,
the bytes held back included. `drop()` resets every open connection (a NAT table
flushed, a peer rebooted).

It runs on the test's event loop: never block that loop while a proxy is in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from ..cluster import free_port

CHUNK = 64 * 1024


class Proxy:
    """127.0.0.1:`port` -> `host`:`target_port`."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = free_port()
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def is_cut(self) -> bool:
        return not self._open.is_set()

    def url(self, template: str) -> str:
        """`template` with `{port}` filled in: e.g. 'redis://127.0.0.1:{port}/0'."""
        return template.format(port=self.port)

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def drop(self) -> None:
        """Reset every open connection (RST, not FIN)."""
        for writer in list(self._writers):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.heal()
        self.drop()  # every link ends on its own once its sockets are gone
        links = list(self._links)
        if links:
            _, late = await asyncio.wait(links, timeout=2.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.add(client_w)
        self.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # a partition: the connection never reaches the server
            server_r, server_w = await asyncio.open_connection(self.host, self.target_port)
            self._writers.add(server_w)
            await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # The link ends; asyncio's server would log a cancelled handler as an error.
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self._links.discard(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            data = await source.read(CHUNK)
            # Held here while cut: later bytes stay in the kernel's buffers.
            await self._open.wait()
            if not data:
                break
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            with contextlib.suppress(OSError):
                sink.write_eof()
