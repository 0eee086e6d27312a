"""In-memory StateStore: a dict per namespace plus a bounded change log, and locks.

No method awaits anything, so on one event loop each is atomic (the fencing
check and the write, a snapshot export).
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from server.domain.errors import (
    AbortedError,
    FailedPreconditionError,
    NotFoundError,
    OutOfRangeError,
)
from server.domain.models import Payload, StateEntry, StateEvent, StateEventType
from server.ports import LockGrant, NamespaceDump


@dataclass(slots=True)
class _Lock:
    token: int = 0
    owner: str = ""
    agent_id: str = ""
    expire_time: float = 0.0  # 0: free

    def held(self, now: float) -> bool:
        return self.expire_time > now


class _Namespace:
    __slots__ = ("entries", "keys", "locks", "log", "revision")

    def __init__(self, log_size: int) -> None:
        self.entries: dict[str, StateEntry] = {}
        self.keys: list[str] = []
        self.log: deque[StateEvent] = deque(maxlen=log_size)
        self.revision = 0
        self.locks: dict[str, _Lock] = {}


def stale_token(lock: str, token: int, current: int, held: bool) -> AbortedError:
    """The error of a write or lock call carrying a token that is not the current grant."""
    state = "held" if held else "not held (released or expired)"
    return AbortedError(
        f"fencing token {token} of lock {lock!r} is stale: the current token is {current}, "
        f"{state}", reason="STALE_FENCING_TOKEN",
        metadata={"lock": lock, "current_token": str(current), "held": str(held).lower()})


def lock_held(name: str, owner: str, agent_id: str, expire_time: float) -> AbortedError:
    """The error of an acquire that met a live holder."""
    return AbortedError(f"lock {name!r} is held by {owner or 'an anonymous owner'!r}",
                        reason="LOCK_HELD",
                        metadata={"lock": name, "owner": owner,
                                  "agent": f"agents/{agent_id}" if agent_id else "",
                                  "expire_time": repr(expire_time)})


class InMemoryStateStore:
    """StateStore for the embedded mode. ``log_size`` bounds the watch history."""

    def __init__(self, log_size: int = 10_000) -> None:
        self._log_size = log_size
        self._ns: dict[str, _Namespace] = defaultdict(lambda: _Namespace(self._log_size))
        self._agent_locks: dict[str, set[tuple[str, str]]] = defaultdict(set)

    def _check_fence(self, ns: _Namespace, fence: tuple[str, int] | None, now: float) -> None:
        if fence is None:
            return
        name, token = fence
        lock = ns.locks.get(name, _Lock())
        if lock.token != token or not lock.held(now):
            raise stale_token(name, token, lock.token, lock.held(now))

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
                  expected_version: int | None, ttl: float, now: float,
                  fence: tuple[str, int] | None = None) -> StateEntry:
        """See StateStore.put."""
        ns = self._ns[namespace]
        self._check_fence(ns, fence, now)
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
                     now: float, fence: tuple[str, int] | None = None) -> int:
        """See StateStore.delete."""
        ns = self._ns[namespace]
        self._check_fence(ns, fence, now)
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
        if not ns.log and after_revision < ns.revision:  # restored: no history
            raise OutOfRangeError(
                f"revision {after_revision} is older than the kept history (none); list "
                f"again and watch from revision {ns.revision}",
                metadata={"oldest": str(ns.revision + 1)})
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

    async def list_locks(self, namespace: str, *, now: float, limit: int) -> list[LockGrant]:
        """See StateStore.list_locks."""
        ns = self._ns.get(namespace)
        if ns is None:
            return []
        held = sorted((name, lock) for name, lock in ns.locks.items() if lock.held(now))
        return [LockGrant(name, lock.owner, lock.agent_id, lock.token, lock.expire_time)
                for name, lock in held[:limit]]

    # -- locks -------------------------------------------------------------------

    def _free(self, namespace: str, name: str, lock: _Lock) -> None:
        if lock.agent_id:
            self._agent_locks[lock.agent_id].discard((namespace, name))
        lock.expire_time, lock.owner, lock.agent_id = 0.0, "", ""

    async def acquire_lock(self, namespace: str, name: str, owner: str, *, agent_id: str,
                           ttl: float, now: float) -> LockGrant:
        """See StateStore.acquire_lock."""
        ns = self._ns[namespace]
        lock = ns.locks.setdefault(name, _Lock())
        if lock.held(now) and not (owner and owner == lock.owner):
            raise lock_held(name, lock.owner, lock.agent_id, lock.expire_time)
        self._free(namespace, name, lock)
        lock.token += 1
        lock.owner, lock.agent_id, lock.expire_time = owner, agent_id, now + ttl
        if agent_id:
            self._agent_locks[agent_id].add((namespace, name))
        return LockGrant(name, owner, agent_id, lock.token, lock.expire_time)

    def _current(self, namespace: str, name: str, token: int, now: float) -> _Lock:
        lock = self._ns[namespace].locks.get(name, _Lock())
        if lock.token != token or not lock.held(now):
            raise stale_token(name, token, lock.token, lock.held(now))
        return lock

    async def renew_lock(self, namespace: str, name: str, fencing_token: int, *, ttl: float,
                         now: float) -> LockGrant:
        """See StateStore.renew_lock."""
        lock = self._current(namespace, name, fencing_token, now)
        lock.expire_time = now + ttl
        return LockGrant(name, lock.owner, lock.agent_id, lock.token, lock.expire_time)

    async def release_lock(self, namespace: str, name: str, fencing_token: int, *,
                           now: float) -> bool:
        """See StateStore.release_lock."""
        lock = self._ns[namespace].locks.get(name, _Lock())
        if lock.token != fencing_token or fencing_token <= 0:
            raise stale_token(name, fencing_token, lock.token, lock.held(now))
        was_held = lock.held(now)
        self._free(namespace, name, lock)
        return was_held

    async def release_agent_locks(self, agent_id: str, *, now: float) -> list[tuple[str, str]]:
        """See StateStore.release_agent_locks."""
        freed: list[tuple[str, str]] = []
        for namespace, name in sorted(self._agent_locks.pop(agent_id, set())):
            lock = self._ns[namespace].locks.get(name)
            if lock is not None and lock.agent_id == agent_id:
                held = lock.held(now)
                self._free(namespace, name, lock)
                if held:
                    freed.append((namespace, name))
        return freed

    # -- snapshots ---------------------------------------------------------------

    async def export_state(self, namespace: str | None, *, now: float) -> dict[str, NamespaceDump]:
        """See StateStore.export_state (no await: one consistent cut)."""
        names = [namespace] if namespace is not None else sorted(self._ns)
        out: dict[str, NamespaceDump] = {}
        for name in names:
            ns = self._ns.get(name)
            if ns is None or (ns.revision == 0 and not ns.locks):
                continue
            entries = tuple(e for e in (ns.entries[k] for k in ns.keys)
                            if not (e.expire_time and e.expire_time <= now))
            out[name] = NamespaceDump(ns.revision, entries,
                                      {k: v.token for k, v in ns.locks.items()})
        return out

    async def import_state(self, dump: Mapping[str, NamespaceDump], *,
                           dry_run: bool = False) -> None:
        """See StateStore.import_state."""
        busy = sorted(n for n in dump if n in self._ns
                      and (self._ns[n].revision or self._ns[n].locks))
        if busy:
            raise FailedPreconditionError(
                f"cannot restore into non-empty namespace(s) {', '.join(busy)}",
                reason="STORE_NOT_EMPTY", metadata={"namespaces": ",".join(busy)})
        if dry_run:
            return
        for name, d in dump.items():
            ns = self._ns[name]
            ns.revision = d.revision
            for entry in d.entries:
                ns.entries[entry.key] = entry
            ns.keys = sorted(ns.entries)
            for lock_name, token in d.lock_tokens.items():
                ns.locks[lock_name] = _Lock(token)

    async def aclose(self) -> None:
        """Nothing to release."""
