"""In-memory StateStore: a dict per namespace plus a bounded change log."""

from __future__ import annotations

import bisect
from collections import defaultdict, deque

from server.domain.errors import AbortedError, NotFoundError, OutOfRangeError
from server.domain.models import Payload, StateEntry, StateEvent, StateEventType


class _Namespace:
    __slots__ = ("entries", "keys", "log", "revision")

    def __init__(self, log_size: int) -> None:
        self.entries: dict[str, StateEntry] = {}
        self.keys: list[str] = []
        self.log: deque[StateEvent] = deque(maxlen=log_size)
        self.revision = 0


class InMemoryStateStore:
    """StateStore for the embedded mode. ``log_size`` bounds the watch history."""

    def __init__(self, log_size: int = 10_000) -> None:
        self._log_size = log_size
        self._ns: dict[str, _Namespace] = defaultdict(lambda: _Namespace(self._log_size))

    def _live(self, ns: _Namespace, key: str, now: float) -> StateEntry | None:
        entry = ns.entries.get(key)
        if entry is None:
            return None
        if entry.expire_time and entry.expire_time <= now:
            self._remove(ns, key, now)
            return None
        return entry

    def _remove(self, ns: _Namespace, key: str, now: float) -> int:
        entry = ns.entries.pop(key)
        i = bisect.bisect_left(ns.keys, key)
        del ns.keys[i]
        ns.revision += 1
        ns.log.append(StateEvent(StateEventType.DELETE, StateEntry(
            key, Payload(), entry.version, ns.revision, now)))
        return ns.revision

    async def get(self, namespace: str, key: str, *, now: float) -> StateEntry | None:
        """See StateStore.get."""
        return self._live(self._ns[namespace], key, now)

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float, now: float) -> StateEntry:
        """See StateStore.put."""
        ns = self._ns[namespace]
        current = self._live(ns, key, now)
        version = current.version if current is not None else 0
        if expected_version is not None and expected_version != version:
            raise AbortedError(
                f"key {key!r} is at version {version}, not {expected_version}",
                reason="VERSION_MISMATCH", metadata={"key": key, "version": str(version)})
        ns.revision += 1
        entry = StateEntry(key, value, version + 1, ns.revision, now,
                           now + ttl if ttl > 0 else 0.0)
        if current is None:
            bisect.insort(ns.keys, key)
        ns.entries[key] = entry
        ns.log.append(StateEvent(StateEventType.PUT, entry))
        return entry

    async def delete(self, namespace: str, key: str, *, expected_version: int | None,
                     now: float) -> int:
        """See StateStore.delete."""
        ns = self._ns[namespace]
        current = self._live(ns, key, now)
        if current is None:
            raise NotFoundError("key", key)
        if expected_version is not None and expected_version != current.version:
            raise AbortedError(
                f"key {key!r} is at version {current.version}, not {expected_version}",
                reason="VERSION_MISMATCH", metadata={"key": key,
                                                     "version": str(current.version)})
        return self._remove(ns, key, now)

    async def list_entries(self, namespace: str, prefix: str, *, after_key: str, limit: int,
                   now: float) -> list[StateEntry]:
        """See StateStore.list_entries."""
        ns = self._ns[namespace]
        start = max(bisect.bisect_left(ns.keys, prefix), bisect.bisect_right(ns.keys, after_key))
        out: list[StateEntry] = []
        i = start
        while i < len(ns.keys) and len(out) < limit:
            key = ns.keys[i]
            if not key.startswith(prefix):
                break
            entry = self._live(ns, key, now)
            if entry is None:
                continue  # removed: the same index now holds the next key
            out.append(entry)
            i += 1
        return out

    async def events_since(self, namespace: str, prefix: str, after_revision: int,
                           limit: int) -> list[StateEvent]:
        """See StateStore.events_since."""
        ns = self._ns[namespace]
        if ns.log and after_revision < ns.log[0].entry.revision - 1:
            raise OutOfRangeError(
                f"revision {after_revision} is older than the kept history "
                f"(oldest {ns.log[0].entry.revision}); list again and watch from "
                f"revision {ns.revision}", metadata={"oldest": str(ns.log[0].entry.revision)})
        if after_revision > ns.revision:
            return []
        out: list[StateEvent] = []
        for event in ns.log:
            if event.entry.revision > after_revision and event.entry.key.startswith(prefix):
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    async def revision(self, namespace: str) -> int:
        """See StateStore.revision."""
        return self._ns[namespace].revision

    async def aclose(self) -> None:
        """Nothing to release."""
