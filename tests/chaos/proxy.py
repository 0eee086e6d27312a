"""A small fault-injecting TCP proxy for the chaos tests (asyncio, one port).

``pause()`` stops forwarding in both directions while keeping every
connection open (a silent network partition: the peers see no error, only
silence); ``resume()`` lets the buffered bytes through. ``drop()`` closes
every connection at once (a reset link); new connections are accepted.
"""

from __future__ import annotations

import asyncio
import contextlib


class FaultyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultyProxy:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        """host:port to give clients."""
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Stop forwarding (connections stay open)."""
        self._open.clear()

    def resume(self) -> None:
        """Forward again."""
        self._open.set()

    def drop(self) -> None:
        """Close every connection now."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def aclose(self) -> None:
        """Stop listening and close everything."""
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._pumps):
            t.cancel()
        for t in list(self._pumps):
            with contextlib.suppress(BaseException):
                await t

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_w})
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pump(src, dst, writer, up_w))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    a: asyncio.StreamWriter, b: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._open.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (a, b):
                self._writers.discard(w)
                w.transport.abort()
