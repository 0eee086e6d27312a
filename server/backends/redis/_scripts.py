"""The Lua files next to this module, run as Redis Functions (FUNCTION LOAD once, FCALL).

Each ``<stem>.lua`` is one library. Its first line is ``#!lua name=agentmesh_<stem>``;
the loader appends ``_<12 hex>``, a hash of the file and of the registration
footer below, to that name and registers two functions under it:

- ``<library>`` runs any op (the Lua ``call`` entry point);
- ``<library>_ro``, flagged ``no-writes``, runs the read-only ops (``call_ro``):
  FCALL_RO, allowed when Redis is out of memory, as read scripts were under EVAL.

The footer registers the file's local functions ``call`` and ``call_ro``. A
library's Lua locals outlive each call and serve every key prefix, so ``call``
first resets everything that depends on the call (KEYS, ARGV, the keys derived
from KEYS[1], caches); ``tests/conformance/test_redis_functions.py`` checks it.

A content-hashed name means replicas running different versions (a rolling
upgrade) never call each other's code, and ``FUNCTION LOAD REPLACE`` of the
same name is harmless. Old versions stay loaded until someone runs
``FUNCTION DELETE`` on them (a replica still using one loads it again).

When Redis answers "Function not found" (restarted without persistence,
``FUNCTION FLUSH``, failover to a node that lacks it), the library is loaded
again and the call retried once, as redis-py's ``Script`` does for NOSCRIPT.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import ResponseError

from server.backends.redis._client import RedisClient
from server.backends.redis._durability import NONE, Durability, fcall_durable

MIN_REDIS_VERSION = (7, 0)
"""Redis Functions (FUNCTION LOAD / FCALL) appeared in Redis 7.0."""

_FOOTER = """
redis.register_function{{function_name = '{name}', callback = call}}
redis.register_function{{function_name = '{name}_ro', callback = call_ro, flags = {{'no-writes'}}}}
"""


class RedisVersionError(RuntimeError):
    """The Redis server is too old for the stores (they need Redis Functions)."""

    def __init__(self, version: str) -> None:
        super().__init__(
            f"agentmesh needs Redis >= {MIN_REDIS_VERSION[0]}.{MIN_REDIS_VERSION[1]} "
            f"(its scripts are Redis Functions: FUNCTION LOAD + FCALL); the server runs "
            f"{version or 'an unknown version'}")
        self.version = version
        """The server's ``redis_version`` (empty when unknown)."""


def check_version(version: str) -> None:
    """Raise :class:`RedisVersionError` unless ``version`` (INFO's redis_version) is new enough."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        raise RedisVersionError(version) from None
    if (major, minor) < MIN_REDIS_VERSION:
        raise RedisVersionError(version)


@cache
def load_script(name: str) -> str:
    """The text of ``server/backends/redis/<name>``."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@cache
def library_code(stem: str) -> tuple[str, str]:
    """The versioned name and the FUNCTION LOAD text of ``<stem>.lua``."""
    return build_library(stem, load_script(f"{stem}.lua"))


def build_library(stem: str, source: str) -> tuple[str, str]:
    """The versioned name and the FUNCTION LOAD text of the library ``source``."""
    first, sep, rest = source.partition("\n")
    if first != f"#!lua name=agentmesh_{stem}":
        raise ValueError(f"{stem}.lua must start with '#!lua name=agentmesh_{stem}'")
    digest = hashlib.sha256((source + _FOOTER).encode()).hexdigest()[:12]
    name = f"agentmesh_{stem}_{digest}"
    return name, f"#!lua name={name}{sep}{rest}{_FOOTER.format(name=name)}"


class Library:
    """One Lua library on one client: ``await lib.call(keys, args)``.

    ``durability`` (``_durability``): how many replicas must confirm a ``call``
    before it returns (``call_ro`` never waits).
    """

    def __init__(self, client: RedisClient, stem: str, durability: Durability = NONE) -> None:
        self._r = client
        self.durability = durability
        self.name, self.code = library_code(stem)
        self._loads = 0
        self._lock: asyncio.Lock | None = None

    async def load(self) -> None:
        """FUNCTION LOAD REPLACE the library on the server (on a cluster: every primary)."""
        try:
            await self._r.function_load(self.code, replace=True)
        except ResponseError as exc:
            if str(exc).startswith("unknown command"):
                raise RedisVersionError("") from exc
            raise
        self._loads += 1

    async def call(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """FCALL the library (any op)."""
        return await self._fcall(False, keys, args)

    async def call_ro(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """FCALL_RO the library's read-only entry point (the op must be a read)."""
        return await self._fcall(True, keys, args)

    async def _fcall(self, ro: bool, keys: Sequence[str],
                     args: Sequence[str | int | float]) -> Any:
        seen = self._loads
        try:
            return await self._send(ro, keys, args)
        except ResponseError as exc:
            if not str(exc).startswith("Function not found"):
                raise
        await self._reload(seen)
        return await self._send(ro, keys, args)

    async def _send(self, ro: bool, keys: Sequence[str],
                    args: Sequence[str | int | float]) -> Any:
        try:
            if ro:
                return await self._r.fcall_ro(self.name + "_ro", len(keys), *keys, *args)
            if self.durability.replicas:
                return await fcall_durable(self._r, self.durability, self.name, keys, args)
            return await self._r.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as exc:
            if str(exc).startswith("unknown command"):
                raise RedisVersionError("") from exc
            raise

    async def _reload(self, seen: int) -> None:
        """Load again, once for all the calls that failed since the last load."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._loads == seen:
                await self.load()
