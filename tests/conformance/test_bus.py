"""Conformance suite of ``server.ports.Bus``: in-process, NATS and RabbitMQ.

Every test runs against each bus, isolated by a unique prefix. Absence of a
message is shown with a fence: a later message on the same subscription must
arrive first (each publisher's order is kept), so no test sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import nats
import pytest

from server.bus import open_bus
from server.bus.memory import InProcessBus, QueueSubscription
from server.bus.nats import stream_name_for
from server.bus.rabbitmq import RabbitMqBus
from server.domain.errors import UnavailableError
from server.ports import Bus, BusMessage, Subscription
from tests._services import require_amqp, require_nats, unique_prefix
from tests.clusters import NatsCluster

TIMEOUT = 5.0
DURABLE = "d1"

BusFactory = Callable[[], Awaitable[Bus]]


@pytest.fixture(params=["memory", "nats", "nats-cluster", "rabbitmq", "rabbitmq-quorum"])
async def bus_factory(request: pytest.FixtureRequest) -> AsyncIterator[BusFactory]:
    """Opens buses of one kind sharing one unique prefix; cleans the broker after.

    ``nats-cluster``: the session's 3-node NATS cluster (stream replicas 3);
    ``rabbitmq-quorum``: durable subscriptions on quorum queues.
    """
    variant: str = request.param
    kind = variant.split("-", 1)[0]
    prefix = unique_prefix("bus")
    opened: list[Bus] = []
    url = "memory://"
    if variant == "nats-cluster":
        cluster: NatsCluster = request.getfixturevalue("shared_nats_cluster")
        url = cluster.url
    elif kind == "nats":
        url = require_nats()
    elif kind == "rabbitmq":
        url = require_amqp()
        if variant == "rabbitmq-quorum":
            url += ("&" if "?" in url else "?") + "queue_type=quorum"

    async def factory() -> Bus:
        bus = await open_bus(url, prefix=prefix)
        opened.append(bus)
        return bus

    yield factory

    for bus in opened:
        await bus.aclose()
    if kind == "nats":
        nc = await nats.connect(url.split(","))
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream_name_for(prefix))
        await nc.close()
    elif kind == "rabbitmq":
        connection = await aio_pika.connect(url.split("?", 1)[0])
        async with connection:
            channel = await connection.channel()
            for bus in opened:
                assert isinstance(bus, RabbitMqBus)
                await channel.queue_delete(bus.durable_queue_name(DURABLE))
                await channel.exchange_delete(bus.exchange_name)


@pytest.fixture
async def bus(bus_factory: BusFactory) -> Bus:
    """One open bus."""
    return await bus_factory()


async def next_msg(sub: Subscription) -> BusMessage:
    """The next message, or fail after TIMEOUT."""
    return await asyncio.wait_for(anext(aiter(sub)), TIMEOUT)


async def wait_until(cond: Callable[[], bool]) -> None:
    """Poll a condition the bus offers no event for (a drop counter), up to TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while not cond():  # noqa: ASYNC110 - drop counters and collectors have no event
            await asyncio.sleep(0.01)


async def test_publish_subscribe(bus: Bus) -> None:
    sub = await bus.subscribe("orders.created")
    await bus.publish("orders.created", b"one")
    await bus.publish("orders.created", b"two")
    first, second = await next_msg(sub), await next_msg(sub)
    assert (first.subject, first.data) == ("orders.created", b"one")
    assert second.data == b"two"
    assert first.ack is None
    assert first.publish_time > 0


async def test_take_ready_returns_queued_messages_in_order(bus: Bus) -> None:
    sub = await bus.subscribe("batch.x")
    for i in range(5):
        await bus.publish("batch.x", str(i).encode())
    first = await next_msg(sub)
    assert first.data == b"0"
    # The rest arrive in order; whatever is already here comes without waiting.
    got: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while len(got) < 4:
            ready = sub.take_ready(2)
            assert len(ready) <= 2
            if not ready:
                got.append((await next_msg(sub)).data)
            got.extend(m.data for m in ready)
    assert got == [b"1", b"2", b"3", b"4"]
    assert sub.take_ready(10) == []
    await sub.unsubscribe()
    assert sub.take_ready(10) == []


async def test_wildcard_star_matches_one_token(bus: Bus) -> None:
    sub = await bus.subscribe("jobs.*.done")
    await bus.publish("jobs.a.done", b"match")
    await bus.publish("jobs.a.b.done", b"too-deep")
    await bus.publish("jobs.done", b"too-short")
    await bus.publish("jobs.b.done", b"fence")
    assert (await next_msg(sub)).subject == "jobs.a.done"
    fence = await next_msg(sub)
    assert (fence.subject, fence.data) == ("jobs.b.done", b"fence")


async def test_wildcard_gt_matches_one_or_more_tokens(bus: Bus) -> None:
    sub = await bus.subscribe("events.>")
    await bus.publish("events", b"no-tail")
    await bus.publish("other.x", b"other")
    await bus.publish("events.a", b"1")
    await bus.publish("events.a.b.c", b"2")
    assert [(await next_msg(sub)).subject for _ in range(2)] == ["events.a", "events.a.b.c"]
    await bus.publish("events.fence", b"fence")
    assert (await next_msg(sub)).subject == "events.fence"


async def test_headers_preserved(bus: Bus) -> None:
    sub = await bus.subscribe("traced")
    headers = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "X-Mixed-Case": "Value with spaces",
    }
    await bus.publish("traced", b"x", headers)
    await bus.publish("traced", b"y")
    got = await next_msg(sub)
    assert dict(got.headers) == headers
    assert dict((await next_msg(sub)).headers) == {}


async def test_invalid_subjects_rejected(bus: Bus) -> None:
    with pytest.raises(ValueError, match="subject"):
        await bus.publish("a.*", b"")
    with pytest.raises(ValueError, match="subject"):
        await bus.publish("a..b", b"")
    with pytest.raises(ValueError, match="pattern"):
        await bus.subscribe("a.>.b")


async def test_queue_group_delivers_each_message_to_one_member(bus: Bus) -> None:
    members = [await bus.subscribe("work.>", queue_group="workers") for _ in range(2)]
    watcher = await bus.subscribe("work.>")
    count = 20
    for i in range(count):
        await bus.publish(f"work.item.{i}", str(i).encode())
    seen = [(await next_msg(watcher)).data for _ in range(count)]
    assert len(set(seen)) == count

    received: list[list[bytes]] = [[], []]

    async def collect(index: int, sub: Subscription) -> None:
        async for msg in sub:
            received[index].append(msg.data)

    tasks = [asyncio.create_task(collect(i, m)) for i, m in enumerate(members)]
    try:
        await wait_until(lambda: len(received[0]) + len(received[1]) >= count)
        # Fence: one more message per member path; duplicates would show up before it.
        await bus.publish("work.fence", b"fence")
        await wait_until(lambda: b"fence" in received[0] + received[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    everything = received[0] + received[1]
    assert sorted(everything) == sorted([*seen, b"fence"])
    assert all(received), f"one member got nothing: {[len(r) for r in received]}"


async def test_each_subscriber_gets_each_message_once_across_bus_instances(
        bus_factory: BusFactory) -> None:
    """Two buses on one prefix (two replicas): a publisher's own subscriptions and
    the other bus's both get every message exactly once, with only its headers."""
    a, b = await bus_factory(), await bus_factory()
    if isinstance(a, InProcessBus):
        pytest.skip("an in-process bus spans one process: two instances share nothing")
    on_a, on_b = await a.subscribe("rep.>"), await b.subscribe("rep.>")
    group = [await a.subscribe("rep.>", queue_group="g"),
             await b.subscribe("rep.>", queue_group="g")]
    for i in range(10):
        await (a if i % 2 == 0 else b).publish(f"rep.{i}", str(i).encode(), {"k": str(i)})
    await a.publish("rep.fence", b"fence")
    await b.publish("rep.fence", b"fence")
    for sub in (on_a, on_b):
        got: list[bytes] = []
        while got.count(b"fence") < 2:
            msg = await next_msg(sub)
            got.append(msg.data)
            if msg.data != b"fence":
                assert dict(msg.headers) == {"k": msg.data.decode()}
        assert sorted(d for d in got if d != b"fence") == [str(i).encode() for i in range(10)]
    # The queue group still gets each message once, whichever bus published it.
    grouped: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        while grouped.count(b"fence") < 2:
            for member in group:
                grouped.extend(m.data for m in member.take_ready(100))
            await asyncio.sleep(0.01)
    assert sorted(d for d in grouped if d != b"fence") == [str(i).encode() for i in range(10)]


async def test_unsubscribe_stops_delivery(bus: Bus) -> None:
    sub = await bus.subscribe("unsub.x")
    other = await bus.subscribe("unsub.x")
    await bus.publish("unsub.x", b"before")
    assert (await next_msg(sub)).data == b"before"
    await sub.unsubscribe()
    await sub.unsubscribe()  # safe to repeat
    await bus.publish("unsub.x", b"after")
    assert (await next_msg(other)).data == b"before"
    assert (await next_msg(other)).data == b"after"
    with pytest.raises(StopAsyncIteration):
        await next_msg(sub)


async def test_slow_consumer_drops_are_counted(bus: Bus) -> None:
    slow = await bus.subscribe("flood", max_pending=5)
    fast = await bus.subscribe("flood")
    total = 50
    for i in range(total):
        await bus.publish("flood", str(i).encode())
    for _ in range(total):
        await next_msg(fast)
    await wait_until(lambda: slow.dropped == total - 5)
    got = [(await next_msg(slow)).data for _ in range(5)]
    assert got == [str(i).encode() for i in range(5)]
    # Nothing else was buffered: the next message is a fresh one.
    await bus.publish("flood", b"later")
    assert (await next_msg(slow)).data == b"later"
    assert slow.dropped == total - 5


async def test_durable_resumes_and_acks(bus: Bus) -> None:
    sub = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    await bus.publish("jobs.one", b"m1", {"k": "v"})
    first = await next_msg(sub)
    assert (first.subject, first.data, dict(first.headers)) == ("jobs.one", b"m1", {"k": "v"})
    assert first.ack is not None
    await first.ack()
    await sub.unsubscribe()

    # Published while no subscriber is attached.
    await bus.publish("jobs.two", b"m2")
    await bus.publish("jobs.three", b"m3")

    again = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    got = [await next_msg(again) for _ in range(2)]
    assert [m.data for m in got] == [b"m2", b"m3"]
    for msg in got:
        assert msg.ack is not None
        await msg.ack()
    await bus.publish("jobs.four", b"m4")
    assert (await next_msg(again)).data == b"m4"  # m1 was acked: not delivered again


async def test_durable_redelivers_what_was_not_acked(bus: Bus) -> None:
    """At-least-once: a message delivered but never acked comes again to the
    next subscriber of the durable, and an acked one does not."""
    sub = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    await bus.publish("jobs.a", b"acked")
    await bus.publish("jobs.b", b"lost-with-its-subscriber")
    got = [await next_msg(sub) for _ in range(2)]
    assert [m.data for m in got] == [b"acked", b"lost-with-its-subscriber"]
    assert got[0].ack is not None
    await got[0].ack()
    await sub.unsubscribe()  # the subscriber goes away holding b, unacked

    again = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    redelivered = await asyncio.wait_for(next_msg(again), 10)
    assert (redelivered.subject, redelivered.data) == ("jobs.b", b"lost-with-its-subscriber")
    assert redelivered.ack is not None
    await redelivered.ack()
    await bus.publish("jobs.c", b"next")
    assert (await next_msg(again)).data == b"next"  # a is not delivered again


async def test_durable_hands_what_a_leaving_member_held_to_the_one_that_stays(
        bus: Bus) -> None:
    leaving = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    await bus.publish("jobs.x", b"held")
    held = await next_msg(leaving)
    assert held.data == b"held"
    staying = await bus.subscribe("jobs.>", durable=DURABLE, max_pending=100)
    await leaving.unsubscribe()  # never acked
    again = await asyncio.wait_for(next_msg(staying), 10)
    assert again.data == b"held" and again.ack is not None
    await again.ack()
    await staying.unsubscribe()


async def test_drain_and_aclose_are_idempotent(bus: Bus) -> None:
    sub = await bus.subscribe("bye")
    await bus.publish("bye", b"last")
    received = await next_msg(sub)
    assert received.data == b"last"
    await bus.drain()
    await bus.drain()
    with pytest.raises(StopAsyncIteration):
        await next_msg(sub)
    await bus.aclose()
    await bus.aclose()
    with pytest.raises(UnavailableError):
        await bus.publish("bye", b"too-late")


async def test_drain_hands_over_buffered_messages(bus: Bus) -> None:
    sub = await bus.subscribe("tail")
    fence = await bus.subscribe("tail")
    await bus.publish("tail", b"a")
    await bus.publish("tail", b"b")
    await next_msg(fence)
    await next_msg(fence)
    await bus.drain()
    assert [m.data async for m in sub] == [b"a", b"b"]


async def test_open_bus_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="unknown bus URL scheme"):
        await open_bus("kafka://localhost:9092")
    bus = await open_bus("")
    assert isinstance(bus, InProcessBus)
    sub = await bus.subscribe("x")
    assert isinstance(sub, QueueSubscription)
    await bus.aclose()
