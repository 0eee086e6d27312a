"""A task cancelled while it publishes on NATS really ends (nats-py swallows it)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.bus.nats import NatsBus
from tests._services import require_nats, unique_prefix


async def test_cancelled_publisher_ends_even_when_the_client_swallows_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bus = await NatsBus.connect(require_nats(), subject_prefix=unique_prefix("cancel"))
    entered = asyncio.Event()

    async def swallowing_publish(*args: object, **kwargs: object) -> None:
        # What nats-py's Client._flush_pending does with a cancellation.
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)

    monkeypatch.setattr(bus._nc, "publish", swallowing_publish)
    try:
        publisher = asyncio.create_task(bus.publish("x.y", b"1"))
        await entered.wait()
        publisher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(publisher, 2)
    finally:
        monkeypatch.undo()
        await bus.aclose()
