"""State use cases: versioned KV, resumable watch, fenced locks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from server.domain.errors import AbortedError, FailedPreconditionError, ResourceExhaustedError
from server.domain.models import Payload, StateEntry, StateEvent
from server.ports import Bus, LockGrant, StateStore, Subscription
from server.services import events
from server.services.clock import Clock

log = logging.getLogger(__name__)

LOCK_RECHECK = 0.5
"""Seconds between re-tries of a blocked acquire when no release is announced
(a lost notification or a lease that ended) -- the upper bound of the delay."""


def lock_subject(namespace: str) -> str:
    """Lock releases of a namespace (body: lock name); wakes blocked acquires."""
    return f"_sys.lock.{namespace}"


class StateService:
    """Versioned KV and locks over the StateStore port.

    Writes are announced on the state subject, releases on the lock subject,
    so watchers and blocked acquires on any replica wake up. ``agent_alive``
    (agent id -> live?) lets AcquireLock refuse an agent session that is gone.
    """

    def __init__(self, store: StateStore, bus: Bus, clock: Clock, *,
                 agent_alive: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self._store = store
        self._bus = bus
        self._clock = clock
        self._agent_alive = agent_alive

    @property
    def store(self) -> StateStore:
        """The StateStore port (snapshots read it)."""
        return self._store

    async def get(self, namespace: str, key: str) -> StateEntry | None:
        """One entry or None."""
        return await self._store.get(namespace, key, now=self._clock.now())

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float,
                  fence: tuple[str, int] | None = None) -> StateEntry:
        """Write, compare-and-set when expected_version is given (AbortedError).

        With ``fence=(lock, token)`` the write lands only while that token is
        the lock's current grant (AbortedError STALE_FENCING_TOKEN).
        """
        entry = await self._store.put(namespace, key, value, expected_version=expected_version,
                                      ttl=ttl, now=self._clock.now(), fence=fence)
        await self._announce(namespace, entry.revision)
        return entry

    async def delete(self, namespace: str, key: str, *, expected_version: int | None,
                     fence: tuple[str, int] | None = None) -> int:
        """Delete; returns the revision. ``fence`` as in :meth:`put`."""
        revision = await self._store.delete(namespace, key, expected_version=expected_version,
                                            now=self._clock.now(), fence=fence)
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

    # -- locks -------------------------------------------------------------------

    async def acquire_lock(self, namespace: str, name: str, owner: str, *, lease: float,
                           wait: float = 0.0, agent_id: str = "") -> LockGrant:
        """Take the lock for ``lease`` seconds, waiting up to ``wait`` seconds.

        A blocked acquire subscribes to the namespace's lock subject (releases
        on any replica wake it), retries when the holder's lease ends, and at
        least every LOCK_RECHECK seconds; it never blocks the event loop. When
        the lock is still held at the end: AbortedError LOCK_HELD naming the holder.
        """
        if agent_id and self._agent_alive is not None and not await self._agent_alive(agent_id):
            raise FailedPreconditionError(f"agent agents/{agent_id} is not live",
                                          reason="AGENT_GONE",
                                          metadata={"agent": f"agents/{agent_id}"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        sub: Subscription | None = None
        wake = asyncio.Event()
        pumper: asyncio.Task[None] | None = None

        async def pump(s: Subscription) -> None:
            async for _ in s:
                wake.set()

        try:
            while True:
                wake.clear()
                try:
                    return await self._store.acquire_lock(
                        namespace, name, owner, agent_id=agent_id, ttl=lease,
                        now=self._clock.now())
                except AbortedError as err:
                    remaining = deadline - loop.time()
                    if err.reason != "LOCK_HELD" or remaining <= 0:
                        raise
                    if sub is None:
                        # Subscribe, then try again at once: a release between
                        # the refusal and the subscription is not missed.
                        sub = await self._bus.subscribe(lock_subject(namespace), max_pending=16)
                        pumper = asyncio.create_task(pump(sub))
                        continue
                    expiry = float(err.metadata.get("expire_time") or 0.0) - self._clock.now()
                    timeout = min(remaining, LOCK_RECHECK, max(expiry, 0.0) + 0.002)
                try:
                    async with asyncio.timeout(timeout):
                        await wake.wait()
                except TimeoutError:
                    pass
        finally:
            if pumper is not None:
                pumper.cancel()
            if sub is not None:
                await sub.unsubscribe()

    async def renew_lock(self, namespace: str, name: str, fencing_token: int, *,
                         lease: float) -> LockGrant:
        """Extend the current grant (AbortedError STALE_FENCING_TOKEN otherwise)."""
        return await self._store.renew_lock(namespace, name, fencing_token, ttl=lease,
                                            now=self._clock.now())

    async def release_lock(self, namespace: str, name: str, fencing_token: int) -> None:
        """Free the lock (idempotent for the latest grant) and wake the waiters."""
        freed = await self._store.release_lock(namespace, name, fencing_token,
                                               now=self._clock.now())
        if freed:
            await self._announce_release(namespace, name)

    async def release_agent_locks(self, agent_id: str) -> int:
        """Free every lock an agent session holds (its agent went away)."""
        freed = await self._store.release_agent_locks(agent_id, now=self._clock.now())
        for namespace, name in freed:
            log.info("lock %s/%s freed: agent %s gone", namespace, name, agent_id)
            await self._announce_release(namespace, name)
        return len(freed)

    async def _announce_release(self, namespace: str, name: str) -> None:
        await events.announce(self._bus, lock_subject(namespace), events.encode({"lock": name}))

    async def _announce(self, namespace: str, revision: int) -> None:
        await events.announce(self._bus, events.state_subject(namespace),
                                events.encode({"rev": revision}))
