"""State use cases: versioned KV and resumable watch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.domain.errors import ResourceExhaustedError
from server.domain.models import Payload, StateEntry, StateEvent
from server.ports import Bus, StateStore
from server.services import events
from server.services.clock import Clock


class StateService:
    """Versioned KV over the StateStore port; writes are announced on the bus."""

    def __init__(self, store: StateStore, bus: Bus, clock: Clock) -> None:
        self._store = store
        self._bus = bus
        self._clock = clock

    async def get(self, namespace: str, key: str) -> StateEntry | None:
        """One entry or None."""
        return await self._store.get(namespace, key, now=self._clock.now())

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float) -> StateEntry:
        """Write, compare-and-set when expected_version is given (AbortedError)."""
        entry = await self._store.put(namespace, key, value, expected_version=expected_version,
                                      ttl=ttl, now=self._clock.now())
        await self._announce(namespace, entry.revision)
        return entry

    async def delete(self, namespace: str, key: str, *, expected_version: int | None) -> int:
        """Delete; returns the revision."""
        revision = await self._store.delete(namespace, key, expected_version=expected_version,
                                            now=self._clock.now())
        await self._announce(namespace, revision)
        return revision

    async def list(self, namespace: str, prefix: str, *, after_key: str,
                   limit: int) -> list[StateEntry]:
        """A page of entries ordered by key."""
        return await self._store.list_entries(namespace, prefix, after_key=after_key,
                                              limit=limit, now=self._clock.now())

    async def watch(self, namespace: str, prefix: str, after_revision: int,
                    batch: int = 500) -> AsyncIterator[StateEvent]:
        """Every change under prefix after ``after_revision`` (0: from now on).

        Subscribes first, then reads the log, so nothing between the two is
        missed; revisions only grow, so nothing is sent twice. OutOfRangeError
        when the asked history is gone.
        """
        sub = await self._bus.subscribe(events.state_subject(namespace), max_pending=64)
        wake = asyncio.Event()

        async def pump() -> None:
            async for _ in sub:
                wake.set()

        pumper = asyncio.create_task(pump())
        try:
            last = after_revision or await self._store.revision(namespace)
            while True:
                wake.clear()
                while True:
                    found = await self._store.events_since(namespace, prefix, last, batch)
                    for event in found:
                        last = event.entry.revision
                        yield event
                    if len(found) < batch:
                        break
                if pumper.done():
                    raise ResourceExhaustedError("state watch subscription ended",
                                                 reason="SLOW_CONSUMER")
                # A dropped notification only delays: the log is re-read on the
                # next wake-up, and at least every second.
                try:
                    async with asyncio.timeout(1.0):
                        await wake.wait()
                except TimeoutError:
                    pass
        finally:
            pumper.cancel()
            await sub.unsubscribe()

    async def _announce(self, namespace: str, revision: int) -> None:
        await self._bus.publish(events.state_subject(namespace),
                                events.encode({"rev": revision}))
