"""Redis StateStore: each write, its revision and its change-log entry are one
Lua script (``state.lua``); so are the fencing check of a write, every lock
step and a snapshot export.

Extra keys beside the package docstring's layout::

    S:locks                       hash    lock name -> {token, owner, agent, expire} JSON
    {P}:st_nss                    set     namespaces that have state or locks (export)
    {P}:lkagent:<agent>           set     [namespace, name] JSON of the locks an agent holds
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from server.backends.memory.state import lock_held, stale_token  # same errors, one wording
from server.backends.redis import codec
from server.backends.redis._client import RedisClient
from server.backends.redis._durability import NONE, Durability
from server.backends.redis._scripts import Library
from server.domain.errors import (
    AbortedError,
    FailedPreconditionError,
    NotFoundError,
    OutOfRangeError,
)
from server.domain.models import Payload, StateEntry, StateEvent
from server.ports import LockGrant, NamespaceDump

logger = logging.getLogger(__name__)

DEFAULT_LOG_SIZE = 10_000


class RedisStateStore:
    """StateStore on Redis; safe to share between server replicas.

    ``log_size`` bounds the change log kept per namespace (the reach of
    ``events_since``). Expired entries are treated as absent and removed lazily
    by the next read or write that meets them, which logs their DELETE.
    """

    def __init__(self, client: RedisClient, prefix: str = "agentmesh", *,
                 log_size: int = DEFAULT_LOG_SIZE, durability: Durability = NONE) -> None:
        if log_size < 1:
            raise ValueError("log_size must be at least 1")
        self._r = client
        self._base = "{" + prefix + "}"
        self._log_size = log_size
        self.library = Library(client, "state", durability)
        """The ``state.lua`` library (loaded by :meth:`RedisStores.connect`, or on first use)."""

    async def _call(self, op: str, namespace: str, *args: str | int | float) -> Any:
        return await self.library.call([self._base], [op, namespace, self._log_size, *args])

    async def _read(self, op: str, namespace: str, *args: str | int | float) -> Any:
        """A read-only op (FCALL_RO)."""
        return await self.library.call_ro([self._base],
                                          [op, namespace, self._log_size, *args])

    def _rev_key(self, namespace: str) -> str:
        return f"{self._base}:st:{len(namespace)}:{namespace}:rev"

    @staticmethod
    def _mismatch(key: str, version: int, expected: int) -> AbortedError:
        return AbortedError(f"key {key!r} is at version {version}, not {expected}",
                            reason="VERSION_MISMATCH",
                            metadata={"key": key, "version": str(version)})

    async def get(self, namespace: str, key: str, *, now: float) -> StateEntry | None:
        """See StateStore.get."""
        raw = await self._call("get", namespace, key, codec.fstr(now))
        return codec.decode_entry(raw) if raw else None

    @staticmethod
    def _stale(fence: tuple[str, int] | None, reply: list[Any]) -> AbortedError:
        name, token = fence or ("", 0)
        return stale_token(name, token, int(reply[1]), bool(int(reply[2])))

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float, now: float,
                  fence: tuple[str, int] | None = None) -> StateEntry:
        """See StateStore.put."""
        expire = now + ttl if ttl > 0 else 0.0
        lock, token = fence or ("", 0)
        # The write's id goes with every retry of this call (the client retries
        # on a lost connection): a retry that finds its own write answers it,
        # instead of a CAS refusing the version its first run created.
        reply = await self._call(
            "put", namespace, key, json.dumps(codec.payload_to_doc(value)),
            "" if expected_version is None else expected_version, codec.fstr(expire),
            codec.fstr(now), lock, token, secrets.token_hex(8))
        if reply[0] == "stale":
            raise self._stale(fence, reply)
        if reply[0] == "mismatch":
            raise self._mismatch(key, int(reply[1]), expected_version or 0)
        return codec.decode_entry(reply[1])

    async def delete(self, namespace: str, key: str, *, expected_version: int | None,
                     now: float, fence: tuple[str, int] | None = None) -> int:
        """See StateStore.delete."""
        lock, token = fence or ("", 0)
        reply = await self._call("delete", namespace, key,
                                 "" if expected_version is None else expected_version,
                                 codec.fstr(now), lock, token)
        if reply[0] == "stale":
            raise self._stale(fence, reply)
        if reply[0] == "notfound":
            raise NotFoundError("key", key)
        if reply[0] == "mismatch":
            raise self._mismatch(key, int(reply[1]), expected_version or 0)
        return int(reply[1])

    async def list_entries(self, namespace: str, prefix: str, *, after_key: str, limit: int,
                           now: float) -> list[StateEntry]:
        """See StateStore.list_entries."""
        if limit <= 0:
            return []
        lower = "(" + after_key if after_key and after_key >= prefix else "[" + prefix
        raws = await self._call("list", namespace, prefix, lower, limit, codec.fstr(now))
        return [codec.decode_entry(r) for r in raws]

    async def events_since(self, namespace: str, prefix: str, after_revision: int,
                           limit: int) -> list[StateEvent]:
        """See StateStore.events_since."""
        reply = await self._read("events", namespace, prefix, after_revision, max(limit, 0))
        if reply[0] == "range":
            oldest, current = int(reply[1]), int(reply[2])
            raise OutOfRangeError(
                f"revision {after_revision} is older than the kept history "
                f"(oldest {oldest}); list again and watch from revision {current}",
                metadata={"oldest": str(oldest)})
        return [codec.decode_event(r) for r in reply[1:]]

    async def revision(self, namespace: str) -> int:
        """See StateStore.revision."""
        raw = await self._r.get(self._rev_key(namespace))
        return int(codec.text(raw)) if raw else 0

    # -- locks -------------------------------------------------------------------

    async def list_locks(self, namespace: str, *, now: float, limit: int) -> list[LockGrant]:
        """See StateStore.list_locks (one HGETALL of the namespace's lock hash)."""
        key = f"{self._base}:st:{len(namespace)}:{namespace}:locks"
        out: list[LockGrant] = []
        for name, raw in (await self._r.hgetall(key)).items():
            rec = json.loads(codec.text(raw))
            if float(rec["expire"]) > now:
                out.append(LockGrant(codec.text(name), str(rec["owner"]), str(rec["agent"]),
                                     int(rec["token"]), float(rec["expire"])))
        out.sort(key=lambda g: g.name)
        return out[:limit]

    @staticmethod
    def _grant(reply: list[Any]) -> LockGrant:
        agent = codec.text(reply[3])
        return LockGrant(codec.text(reply[1]), codec.text(reply[2]), agent, int(reply[4]),
                         float(reply[5]))

    async def acquire_lock(self, namespace: str, name: str, owner: str, *, agent_id: str,
                           ttl: float, now: float) -> LockGrant:
        """See StateStore.acquire_lock."""
        reply = await self._call("acquire", namespace, name, owner, agent_id,
                                 codec.fstr(now + ttl), codec.fstr(now))
        if reply[0] == "held":
            held = self._grant(reply)
            raise lock_held(name, held.owner, held.agent_id, held.expire_time)
        return self._grant(reply)

    async def renew_lock(self, namespace: str, name: str, fencing_token: int, *, ttl: float,
                         now: float) -> LockGrant:
        """See StateStore.renew_lock."""
        reply = await self._call("renew", namespace, name, fencing_token,
                                 codec.fstr(now + ttl), codec.fstr(now))
        if reply[0] == "stale":
            raise self._stale((name, fencing_token), reply)
        return self._grant(reply)

    async def release_lock(self, namespace: str, name: str, fencing_token: int, *,
                           now: float) -> bool:
        """See StateStore.release_lock."""
        reply = await self._call("release", namespace, name, fencing_token, codec.fstr(now))
        if reply[0] == "stale":
            raise self._stale((name, fencing_token), reply)
        return bool(int(reply[1]))

    async def release_agent_locks(self, agent_id: str, *, now: float) -> list[tuple[str, str]]:
        """See StateStore.release_agent_locks."""
        raws = await self._call("release_agent", "", agent_id, codec.fstr(now))
        freed = [json.loads(r) for r in raws]
        return sorted((str(ns), str(name)) for ns, name in freed)

    # -- snapshots ---------------------------------------------------------------

    async def export_state(self, namespace: str | None, *, now: float) -> dict[str, NamespaceDump]:
        """See StateStore.export_state.

        One script reads every namespace, so the export is one consistent cut
        (each namespace at one revision). It blocks Redis while it copies, in
        O(entries): the price of consistency without MVCC.
        """
        rows = await self._read("export", namespace or "", "1" if namespace is not None else "",
                                codec.fstr(now))
        out: dict[str, NamespaceDump] = {}
        for ns, revision, entries, tokens in rows:
            locks = {codec.text(tokens[i]): int(tokens[i + 1]) for i in range(0, len(tokens), 2)}
            out[codec.text(ns)] = NamespaceDump(
                int(revision), tuple(codec.decode_entry(e) for e in entries), locks)
        return out

    async def import_state(self, dump: Mapping[str, NamespaceDump], *,
                           dry_run: bool = False) -> None:
        """See StateStore.import_state (one script: checked and written atomically)."""
        doc = [[ns, d.revision, [_encode_entry(e) for e in d.entries], dict(d.lock_tokens)]
               for ns, d in dump.items()]
        reply = await self._call("import", "", json.dumps(doc, separators=(",", ":")),
                                 "1" if dry_run else "")
        if reply[0] == "busy":
            busy = sorted(codec.text(x) for x in reply[1:])
            raise FailedPreconditionError(
                f"cannot restore into non-empty namespace(s) {', '.join(busy)}",
                reason="STORE_NOT_EMPTY", metadata={"namespaces": ",".join(busy)})

    async def aclose(self) -> None:
        """Nothing of its own: the connection belongs to :class:`RedisStores`."""


def _encode_entry(e: StateEntry) -> str:
    """A StateEntry as the JSON text ``state.lua`` stores."""
    return codec.dumps({"key": e.key, "value": codec.payload_to_doc(e.value),
                        "version": e.version, "revision": e.revision,
                        "update_time": codec.fstr(e.update_time),
                        "expire_time": codec.fstr(e.expire_time)})
