"""Plumbing shared by the bidirectional streams (heartbeat, work)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeAlias, TypeVar

from server.api.errors import check
from server.domain.errors import InvalidArgumentError

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Pack: TypeAlias = Callable[[list[Resp]], tuple[list[Resp], list[Req]]]
"""Merges the responses ready at one moment: (messages to send, requests to handle
as if the peer had sent them)."""


async def first_message(requests: AsyncIterator[Req], kind: str, field: str) -> Req:
    """The stream's first message, which must carry the oneof ``kind``."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        raise InvalidArgumentError.field(field, "the stream ended before its first message") \
            from None
    check(first)
    which = getattr(first, "WhichOneof", None)
    if which is None or which("kind") != kind:
        raise InvalidArgumentError.field(field, f"the first message must be `{kind}`")
    return first


class Duplex(Generic[Req, Resp]):
    """Reads requests in a task of its own while the handler yields responses.

    The outbox is bounded; ``send`` of a response past the bound ends the
    stream (the peer is not reading), never buffers without limit. ``pack``
    may merge the responses that are ready at one moment into fewer messages;
    it may also answer for the peer a response that cannot be sent at all (an
    assignment too large for any message), returning a request that is
    handled as if the peer had sent it. Requests are handled one at a time.
    """

    def __init__(self, requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[None]],
                 max_outbox: int, pack: Pack[Resp, Req] | None = None) -> None:
        self._requests = requests
        self._pack = pack
        self._handle = handle
        self._handling = asyncio.Lock()
        self._outbox: asyncio.Queue[Resp | None] = asyncio.Queue(maxsize=max_outbox)
        self._error: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None
        self.overflowed = False

    def send(self, item: Resp | None) -> None:
        """Queue a response (None ends the stream)."""
        try:
            self._outbox.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            self._close_now()

    def _close_now(self) -> None:
        while not self._outbox.empty():
            self._outbox.get_nowait()
        self._outbox.put_nowait(None)

    async def _read(self) -> None:
        try:
            async for request in self._requests:
                check(request)
                async with self._handling:
                    await self._handle(request)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by responses()
            self._error = exc
        finally:
            if not self.overflowed:
                with contextlib.suppress(asyncio.QueueFull):
                    self._outbox.put_nowait(None)
                if self._outbox.full():
                    self._close_now()

    async def responses(self) -> AsyncIterator[Resp]:
        """Yield queued responses until the stream ends; re-raise the reader's error."""
        self._reader = asyncio.create_task(self._read())
        try:
            ended = False
            while not ended:
                item = await self._outbox.get()
                if item is None:
                    break
                if self._pack is None:
                    yield item
                    continue
                # Everything ready now goes out together, so the peer can read
                # several assignments from one message under load.
                ready = [item]
                while not self._outbox.empty():
                    more = self._outbox.get_nowait()
                    if more is None:
                        ended = True
                        break
                    ready.append(more)
                packed, answered = self._pack(ready)
                for message in packed:
                    yield message
                for request in answered:
                    async with self._handling:
                        await self._handle(request)
            if self._error is not None:
                raise self._error
        finally:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
