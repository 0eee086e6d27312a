"""Buses: in-process, NATS and RabbitMQ implementations of ``server.ports.Bus``.

``open_bus`` picks one from a URL; the broker modules are imported only when
their scheme is asked for.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from server.bus.memory import InProcessBus
from server.ports import Bus

__all__ = ["InProcessBus", "open_bus"]


async def open_bus(url: str, *, prefix: str = "agentmesh", stream_replicas: int = 0) -> Bus:
    """Open the bus named by ``url``.

    ``""`` or ``memory://`` -> ``InProcessBus``; ``nats://host:port`` (a
    comma-separated list for a cluster) -> ``NatsBus``; ``amqp://`` or
    ``amqps://`` -> ``RabbitMqBus``. ``prefix`` isolates meshes on a shared
    broker (NATS subject prefix, RabbitMQ exchange prefix); the in-process bus
    ignores it. ``stream_replicas``: NATS JetStream replicas of the durable
    stream (0: automatic, see ``NatsBus``). ``amqp://...?queue_type=quorum``:
    RabbitMQ durable subscriptions on quorum queues (``RabbitMqBus``).
    ValueError for any other scheme.
    """
    scheme = urlsplit(url).scheme.lower() if url else "memory"
    if scheme == "memory":
        return InProcessBus()
    if scheme in ("nats", "tls"):
        from server.bus.nats import NatsBus  # noqa: PLC0415 - optional dependency

        servers = [part.strip() for part in url.split(",") if part.strip()]
        return await NatsBus.connect(servers, subject_prefix=prefix,
                                     stream_replicas=stream_replicas)
    if scheme in ("amqp", "amqps"):
        from server.bus.rabbitmq import RabbitMqBus  # noqa: PLC0415 - optional dependency

        return await RabbitMqBus.connect(url, prefix=prefix)
    raise ValueError(
        f"unknown bus URL scheme {scheme!r} in {url!r}: "
        "use memory://, nats://host:port or amqp(s)://user:pass@host:port/vhost"
    )
