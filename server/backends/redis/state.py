"""Redis StateStore: each write, its revision and its change-log entry are one
Lua script (``state.lua``)."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis.asyncio as aioredis

from server.backends.redis import codec
from server.backends.redis._scripts import load_script
from server.domain.errors import AbortedError, NotFoundError, OutOfRangeError
from server.domain.models import Payload, StateEntry, StateEvent

logger = logging.getLogger(__name__)

DEFAULT_LOG_SIZE = 10_000


class RedisStateStore:
    """StateStore on Redis; safe to share between server replicas.

    ``log_size`` bounds the change log kept per namespace (the reach of
    ``events_since``). Expired entries are treated as absent and removed lazily
    by the next read or write that meets them, which logs their DELETE.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "agentmesh", *,
                 log_size: int = DEFAULT_LOG_SIZE) -> None:
        if log_size < 1:
            raise ValueError("log_size must be at least 1")
        self._r = client
        self._base = "{" + prefix + "}"
        self._log_size = log_size
        self._script = client.register_script(load_script("state.lua"))

    async def _call(self, op: str, namespace: str, *args: str | int | float) -> Any:
        return await self._script(keys=[self._base],
                                  args=[op, namespace, self._log_size, *args])

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

    async def put(self, namespace: str, key: str, value: Payload, *,
                  expected_version: int | None, ttl: float, now: float) -> StateEntry:
        """See StateStore.put."""
        expire = now + ttl if ttl > 0 else 0.0
        reply = await self._call(
            "put", namespace, key, json.dumps(codec.payload_to_doc(value)),
            "" if expected_version is None else expected_version, codec.fstr(expire),
            codec.fstr(now))
        if reply[0] == "mismatch":
            raise self._mismatch(key, int(reply[1]), expected_version or 0)
        return codec.decode_entry(reply[1])

    async def delete(self, namespace: str, key: str, *, expected_version: int | None,
                     now: float) -> int:
        """See StateStore.delete."""
        reply = await self._call("delete", namespace, key,
                                 "" if expected_version is None else expected_version,
                                 codec.fstr(now))
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
        reply = await self._call("events", namespace, prefix, after_revision, max(limit, 0))
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

    async def aclose(self) -> None:
        """Nothing of its own: the connection belongs to :class:`RedisStores`."""
