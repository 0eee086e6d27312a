"""What the broker keeps for a durable subscription on a cluster-shaped broker.

The bus conformance suite runs on a 3-node NATS cluster and on RabbitMQ quorum
queues too (``test_bus.py``: ``nats-cluster``, ``rabbitmq-quorum``); these tests
check the broker side: the JetStream stream has 3 replicas, and RabbitMQ's
durable queue is a quorum queue (it refuses to be redeclared as classic).
"""

from __future__ import annotations

import aio_pika
import aio_pika.exceptions
import nats
import pytest

from server.bus import open_bus
from server.bus.nats import NatsBus
from server.bus.rabbitmq import RabbitMqBus, split_queue_type
from tests._services import require_amqp, require_nats, unique_prefix
from tests.clusters import NatsCluster


async def test_durable_stream_on_a_nats_cluster_has_three_replicas(
        shared_nats_cluster: NatsCluster) -> None:
    bus = await open_bus(shared_nats_cluster.url, prefix=unique_prefix("ncl"))
    assert isinstance(bus, NatsBus) and bus.stream_replicas == 3
    nc = await nats.connect(shared_nats_cluster.url.split(","))
    try:
        sub = await bus.subscribe("jobs", durable="w")
        info = await nc.jetstream().stream_info(bus.stream_name)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        await sub.unsubscribe()
    finally:
        await bus.aclose()
        await nc.jetstream().delete_stream(bus.stream_name)
        await nc.close()


async def test_a_single_nats_server_gets_one_replica() -> None:
    bus = await open_bus(require_nats(), prefix=unique_prefix("n1"))
    try:
        assert isinstance(bus, NatsBus) and bus.stream_replicas == 1
    finally:
        await bus.aclose()


def test_queue_type_url_parameter() -> None:
    assert split_queue_type("amqp://g:g@h:5672/vh?queue_type=quorum&heartbeat=30") == (
        "amqp://g:g@h:5672/vh?heartbeat=30", "quorum")
    assert split_queue_type("amqp://h/") == ("amqp://h/", None)


@pytest.mark.rabbitmq
async def test_rabbitmq_durable_queue_is_a_quorum_queue_when_asked() -> None:
    url = require_amqp()
    prefix = unique_prefix("quorum")
    bus = await open_bus(url + "?queue_type=quorum", prefix=prefix)
    assert isinstance(bus, RabbitMqBus) and bus.queue_type == "quorum"
    connection = await aio_pika.connect(url)
    try:
        sub = await bus.subscribe("jobs.>", durable="workers")
        await bus.publish("jobs.a", b"1")
        msg = await anext(aiter(sub))
        assert msg.data == b"1" and msg.ack is not None
        await msg.ack()
        name = bus.durable_queue_name("workers")
        channel = await connection.channel()
        same = await channel.declare_queue(name, durable=True,
                                           arguments={"x-queue-type": "quorum"})
        assert same.name == name
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            other = await connection.channel()
            await other.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
        await sub.unsubscribe()
    finally:
        await bus.aclose()
        channel = await connection.channel()
        await channel.queue_delete(bus.durable_queue_name("workers"))
        await channel.exchange_delete(bus.exchange_name)
        await connection.close()
    with pytest.raises(ValueError, match="queue_type"):
        await RabbitMqBus.connect(url + "?queue_type=stream", prefix=prefix)
