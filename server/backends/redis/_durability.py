"""When a mutating Function call counts as done: the ``durability`` setting.

Redis replicates asynchronously: a primary answers a write before any replica
has it, so a write acknowledged to a client can vanish when the primary dies
and its replica is promoted. With ``replicas:N`` every mutating call (FCALL,
not FCALL_RO) is sent in one pipeline with ``WAIT N <timeout>`` on the same
connection: the reply comes once N replicas have the write (one round trip,
plus the replicas' acknowledgement). When fewer than N acknowledge within the
timeout, the call raises :class:`~server.domain.errors.UnavailableError`
(UNAVAILABLE): the write happened on the primary and may or may not survive a
failover, so the client retries (submits carry a request id; results and
leases are fenced, so a retry is harmless).

Values (``AGENTMESH_DURABILITY`` / ``--durability``):

- ``auto`` (default): ``replicas:1`` when the primary serving the deployment's
  slot has a replica when the stores connect, else ``none``. Production shape
  (a Redis Cluster or a primary with a replica) gets no acknowledged write lost
  on failover; a single dev server is not slowed by a WAIT that can never succeed.
- ``none``: answer when the primary has applied the write. On a failover the
  writes of the last moment (up to the replication lag, typically well under
  a second) can be lost: a submitted task may be gone, a completed one RUNNING
  again (its lease expires and another agent runs it: at-least-once still holds
  for what survived), a state version may be reused.
- ``replicas:N``: WAIT for N replicas (1 to 5).

A single server has no failover: there durability is the server's own AOF
setting (``appendonly yes`` + ``appendfsync always`` loses nothing acknowledged
on a crash; ``everysec`` up to one second). WAITAOF (Redis 7.2+) is not used:
the minimum server is 7.0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from server.backends.redis._client import FAILOVER_ERRORS, FunctionCluster, RedisClient
from server.domain.errors import UnavailableError

__all__ = ["Durability", "fcall_durable", "parse_durability"]

logger = logging.getLogger(__name__)

_REPLICAS = re.compile(r"replicas:([1-5])")


@dataclass(frozen=True, slots=True)
class Durability:
    """How many replicas must have a write before the call returns (0: none)."""

    replicas: int = 0
    timeout: float = 1.0
    """Seconds WAIT waits for the replicas."""
    auto: bool = False
    """``auto`` (resolved to a replica count by :meth:`resolve` once the topology is known)."""

    def resolve(self, replicas_present: int) -> Durability:
        """The setting for a primary with ``replicas_present`` replicas (``auto`` only)."""
        if not self.auto:
            return self
        return Durability(min(replicas_present, 1), self.timeout)

    def describe(self) -> str:
        """The setting as written (``none``, ``replicas:1``)."""
        return f"replicas:{self.replicas}" if self.replicas else "none"


NONE = Durability()


def parse_durability(value: str, timeout: float = 1.0) -> Durability:
    """``auto``, ``none`` or ``replicas:N`` (1..5); ValueError for anything else."""
    text = value.strip().lower()
    if timeout <= 0:
        raise ValueError(f"durability timeout must be > 0, got {timeout}")
    if text == "auto":
        return Durability(timeout=timeout, auto=True)
    if text == "none":
        return Durability(timeout=timeout)
    match = _REPLICAS.fullmatch(text)
    if match is None:
        raise ValueError(f"durability must be auto, none or replicas:N (N 1..5), got {value!r}")
    return Durability(int(match.group(1)), timeout)


async def fcall_durable(client: RedisClient, durability: Durability, name: str,
                        keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
    """FCALL ``name`` and WAIT on the same connection, in one pipeline.

    Raises the call's own error as a direct call would (not annotated by the
    pipeline), and UnavailableError when fewer replicas than asked confirm.
    """
    wait_ms = max(1, int(durability.timeout * 1000))
    if isinstance(client, RedisCluster):
        assert isinstance(client, FunctionCluster)
        cluster = client

        async def on_cluster() -> tuple[Any, Any]:
            # The pipeline hands back a node's connection error as a result
            # (raise_on_error=False): raise it, so the failover is ridden out.
            pipe: Any = cluster.pipeline()
            pipe.execute_command("FCALL", name, len(keys), *keys, *args)
            pipe.execute_command("WAIT", durability.replicas, wait_ms,
                                 target_nodes=cluster.slot_primary(keys[0]))
            replies = await pipe.execute(raise_on_error=False)
            for item in replies:
                if isinstance(item, FAILOVER_ERRORS):
                    raise item
            return replies[0], replies[1]

        reply, acked = await cluster.ride_out_failover(on_cluster, f"FCALL {name} + WAIT")
    else:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("FCALL", name, len(keys), *keys, *args)
        pipe.execute_command("WAIT", durability.replicas, wait_ms)
        try:
            reply, acked = await pipe.execute(raise_on_error=False)
        except FAILOVER_ERRORS as exc:  # as GuardedRedis does for a plain command
            raise UnavailableError(f"redis: FCALL {name} + WAIT failed: {exc}",
                                   reason="STORE_UNAVAILABLE") from exc
    if isinstance(reply, BaseException):
        raise reply
    if isinstance(acked, BaseException):
        raise UnavailableError(f"redis WAIT failed after {name}: {acked}") from acked
    if int(acked) < durability.replicas:
        raise UnavailableError(
            f"redis: the write was confirmed by {acked} of {durability.replicas} replicas "
            f"within {durability.timeout} s (durability {durability.describe()}); "
            "it may or may not survive a failover: retry")
    return reply
