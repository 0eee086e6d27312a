"""The Redis client of the stores: one server (``redis://``) or a Redis Cluster.

Store URLs:

- ``redis://[user:pass@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path``:
  one server, through ``redis.asyncio.Redis``.
- ``redis+cluster://[user:pass@]host:port,host:port,...`` (``rediss+cluster://``
  for TLS): a Redis Cluster through ``redis.asyncio.cluster.RedisCluster``. The
  addresses are seeds: any reachable node gives the client the whole topology,
  so list a few (not necessarily all). No database number (a cluster has only 0).

On a cluster, every key of a deployment carries the hash tag ``{prefix}``
(see the package docstring), so one deployment lives in one slot and every
Function call is a single-slot call. :class:`FunctionCluster` routes FCALL
and FCALL_RO by the keys they declare, as redis-py does for EVAL (redis-py
would otherwise ask a node ``COMMAND GETKEYS`` before every call: a second
round trip), and refuses a call whose keys span slots before sending it. It
also rides out a failover: while a primary is down and its replica not yet
promoted, commands fail with connection errors or CLUSTERDOWN; redis-py
retries them a few times without waiting, and this client keeps retrying,
with jittered backoff, for up to ``failover_timeout`` seconds, then raises
UnavailableError (UNAVAILABLE to the caller, never INTERNAL).

FUNCTION LOAD goes to every primary (redis-py sends it to all of them); the
primaries replicate it to their replicas, so a promoted replica already has
the libraries. A primary that lacks them (a node added later, a slot migrated)
answers "Function not found" and the library is loaded again on every primary
(``_scripts.Library``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.domain.errors import UnavailableError

__all__ = ["CLUSTER_SCHEMES", "FAILOVER_ERRORS", "ClusterAddress", "FunctionCluster", "RedisClient",
           "is_cluster_url", "open_client", "parse_cluster_url"]

logger = logging.getLogger(__name__)

RedisClient = aioredis.Redis | RedisCluster
"""What the stores talk to: one server or a cluster (the same command methods)."""

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
FAILOVER_ERRORS = (RedisConnectionError, RedisTimeoutError, ClusterDownError,
                   SlotNotCoveredError)
"""What a command meets while a primary is down and not yet replaced."""

T = TypeVar("T")


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://``."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """A parsed ``redis+cluster://`` URL."""

    seeds: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_cluster_url(url: str) -> ClusterAddress:
    """Parse ``redis+cluster://[user:pass@]host:port,host:port[/]``; ValueError if malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {url!r} (use redis+cluster://host:port,...)")
    rest, _, query = rest.partition("?")
    if query and parse_qs(query):
        raise ValueError(f"{url!r}: a redis+cluster URL takes no query parameters")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"{url!r}: a Redis Cluster has only database 0")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, has_pw, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
    seeds = []
    for part in netloc.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: each seed must be host:port, got {part!r}")
        seeds.append((host.strip("[]"), int(port)))
    return ClusterAddress(tuple(seeds), scheme.lower() == "rediss+cluster", username, password)


class FunctionCluster(RedisCluster):
    """``RedisCluster`` that routes Function calls by their keys and rides out failovers."""

    failover_timeout: float = 30.0
    """Seconds a command keeps being retried while the cluster fails over."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in ("FCALL", "FCALL_RO"):
            keys = args[2:2 + int(args[1])]
            slots = {self.keyslot(k) for k in keys}
            if len(slots) != 1:
                raise RedisClusterException(
                    f"{command} {args[0]}: its keys must map to exactly one slot, "
                    f"got {sorted(slots)} for {list(keys)!r}")
            return slots.pop()
        return await super()._determine_slot(command, *args)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return await self.ride_out_failover(
            lambda: super(FunctionCluster, self).execute_command(*args, **kwargs), str(args[0]))

    async def ride_out_failover(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """``await attempt()``, again with jittered backoff while it fails with a
        connection error, a timeout or CLUSTERDOWN, for up to ``failover_timeout``
        seconds; then UnavailableError. The topology is read again between tries."""
        deadline = time.monotonic() + self.failover_timeout
        delay = 0.05
        while True:
            try:
                return await attempt()
            except FAILOVER_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise UnavailableError(f"redis cluster: {what} failed: {exc}") from exc
                logger.info("redis cluster: %s failed (%s); retrying", what, exc)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 1.0)
            with contextlib.suppress(*FAILOVER_ERRORS, RedisClusterException):
                await self.nodes_manager.initialize()

    def slot_primary(self, key: str) -> ClusterNode:
        """The primary node serving ``key``'s slot, as the client knows the topology."""
        node = self.nodes_manager.get_node_from_slot(self.keyslot(key))
        assert node is not None
        return node


class GuardedRedis(aioredis.Redis):
    """One server: a command that still fails with a connection error or a
    timeout once redis-py's retries are spent raises UnavailableError
    (UNAVAILABLE to the caller, never INTERNAL), so clients retry or fail over."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise UnavailableError(f"redis: {args[0] if args else 'command'} failed: {exc}",
                                   reason="STORE_UNAVAILABLE") from exc


def open_client(url: str, *, socket_timeout: float = 5.0, retries: int = 8,
                failover_timeout: float = 30.0) -> RedisClient:
    """A client for the store URL (not connected yet; the first command connects).

    Single server: commands are retried ``retries`` times with jittered
    exponential backoff on connection errors and timeouts (a Redis restart).
    Cluster: redis-py's own retries, then up to ``failover_timeout`` seconds more.
    """
    if not is_cluster_url(url):
        return GuardedRedis.from_url(
            url, decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout, health_check_interval=30,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError])
    address = parse_cluster_url(url)
    client = FunctionCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.seeds],
        decode_responses=True, socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout, health_check_interval=30,
        username=address.username, password=address.password, ssl=address.tls,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries))
    client.failover_timeout = failover_timeout
    return client
