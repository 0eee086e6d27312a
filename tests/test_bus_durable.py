"""BusService.SubscribeDurable end to end: at least once, acked by delivery id.

Run on the embedded mesh (in-process bus) and on NATS (JetStream): what a
stream received and did not ack comes again to the next stream of the same
consumer; what it acked never does; consumers are per namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from agentmesh.v1 import bus_pb2, bus_pb2_grpc, common_pb2

from agent_sdk import MeshClient
from server.app import Mesh, running_server
from tests._services import require_nats, unique_prefix
from tests.conftest import embedded_settings

IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(params=["memory", "nats"])
async def mesh(request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    bus = "memory://" if request.param == "memory" else require_nats()
    settings = embedded_settings(bus=bus, key_prefix=unique_prefix("durable"))
    async with running_server(settings) as running:
        yield running


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[bus_pb2_grpc.BusServiceStub]:
    async with grpc.aio.insecure_channel(mesh.address) as channel:
        yield bus_pb2_grpc.BusServiceStub(channel)


class Stream:
    """One SubscribeDurable call: the request queue and the responses."""

    def __init__(self, stub: bus_pb2_grpc.BusServiceStub, name: str, namespace: str = "",
                 subject: str = "jobs.>") -> None:
        self.requests: asyncio.Queue[bus_pb2.SubscribeDurableRequest | None] = asyncio.Queue()
        self.requests.put_nowait(bus_pb2.SubscribeDurableRequest(open=bus_pb2.DurableOpen(
            namespace=namespace, subject=subject, durable_name=name)))
        self.call = stub.SubscribeDurable(self._requests())

    async def _requests(self) -> AsyncIterator[bus_pb2.SubscribeDurableRequest]:
        while (item := await self.requests.get()) is not None:
            yield item

    async def next(self) -> bus_pb2.SubscribeDurableResponse:
        response = await asyncio.wait_for(self.call.read(), 10)
        assert isinstance(response, bus_pb2.SubscribeDurableResponse), response
        return response

    def ack(self, *ids: int) -> None:
        self.requests.put_nowait(bus_pb2.SubscribeDurableRequest(
            ack=bus_pb2.DurableAck(delivery_ids=ids)))

    async def close(self) -> None:
        self.call.cancel()


async def publish(stub: bus_pb2_grpc.BusServiceStub, subject: str, data: bytes,
                  namespace: str = "") -> None:
    await stub.Publish(bus_pb2.PublishRequest(namespace=namespace, message=bus_pb2.BusMessage(
        subject=subject, payload=common_pb2.Payload(data=data))))


async def opened(stub: bus_pb2_grpc.BusServiceStub, name: str, **kw: str) -> Stream:
    """A stream whose consumer exists: the response headers came."""
    stream = Stream(stub, name, **kw)
    await asyncio.wait_for(stream.call.initial_metadata(), 10)
    return stream


async def test_unacked_messages_come_again_and_acked_ones_never(
        stub: bus_pb2_grpc.BusServiceStub) -> None:
    first = await opened(stub, "workers")
    for data in (b"one", b"two", b"three"):
        await publish(stub, "jobs.x", data)
    got = [await first.next() for _ in range(3)]
    assert [g.message.payload.data for g in got] == [b"one", b"two", b"three"]
    assert got[0].message.subject == "jobs.x"
    assert len({g.delivery_id for g in got}) == 3
    first.ack(got[0].delivery_id, got[1].delivery_id, got[1].delivery_id, 999_999)
    await publish(stub, "jobs.x", b"fence")  # acks travel in order before this is read
    fence = await first.next()
    first.ack(fence.delivery_id)
    await publish(stub, "jobs.x", b"second-fence")
    assert (await first.next()).message.payload.data == b"second-fence"  # never acked
    await first.close()

    second = Stream(stub, "workers")
    again = sorted([(await second.next()).message.payload.data for _ in range(2)])
    assert again == [b"second-fence", b"three"]  # one and two were acked: lost nothing,
    await publish(stub, "jobs.x", b"four")       # and acked ones do not come back
    nxt = await second.next()
    assert nxt.message.payload.data == b"four"
    await second.close()


async def test_messages_wait_for_the_next_stream_and_namespaces_are_apart(
        stub: bus_pb2_grpc.BusServiceStub) -> None:
    stream = await opened(stub, "late")
    await stream.close()
    await publish(stub, "jobs.y", b"while-away")
    await publish(stub, "jobs.y", b"other-namespace", "team-b")
    back = Stream(stub, "late")
    got = await back.next()
    assert got.message.payload.data == b"while-away"
    back.ack(got.delivery_id)
    other = await opened(stub, "late", namespace="team-b")  # same name, own consumer
    await publish(stub, "jobs.y", b"only-b", "team-b")
    assert (await other.next()).message.payload.data == b"only-b"
    await back.close()
    await other.close()


async def test_bad_streams_are_refused(stub: bus_pb2_grpc.BusServiceStub) -> None:
    async def code(*requests: bus_pb2.SubscribeDurableRequest) -> grpc.StatusCode:
        async def gen() -> AsyncIterator[bus_pb2.SubscribeDurableRequest]:
            for r in requests:
                yield r
            await asyncio.sleep(10)  # keep the request side open

        call = stub.SubscribeDurable(gen())
        try:
            async with asyncio.timeout(10):
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    def open_(**kw: object) -> bus_pb2.SubscribeDurableRequest:
        values: dict[str, object] = {"subject": "jobs.>", "durable_name": "ok"}
        values.update(kw)
        return bus_pb2.SubscribeDurableRequest(open=bus_pb2.DurableOpen(**values))  # type: ignore[arg-type]

    ack = bus_pb2.SubscribeDurableRequest(ack=bus_pb2.DurableAck(delivery_ids=[1]))
    assert await code(ack) == IA
    assert await code(open_(durable_name="no.dots")) == IA
    assert await code(open_(durable_name="")) == IA
    assert await code(open_(subject="a.>.b")) == IA
    assert await code(open_(max_in_flight=-1)) == IA
    assert await code(open_(namespace="Bad NS")) == IA
    assert await code(open_(), open_()) == IA  # open twice
    # a consumer keeps its pattern
    keep = await opened(stub, "fixed")
    assert await code(open_(durable_name="fixed", subject="other.>")) == \
        grpc.StatusCode.FAILED_PRECONDITION
    await keep.close()


async def test_sdk_subscribe_durable_acks_and_redelivers(mesh: Mesh) -> None:
    async with MeshClient(mesh.address) as client:
        first = client.subscribe_durable("sdk.>", "sdk-workers")
        pending = asyncio.ensure_future(anext(first))
        for i in range(50):  # until the consumer exists
            await client.publish("sdk.job", {"n": i})
            done, _ = await asyncio.wait({pending}, timeout=0.2)
            if done:
                break
        msg = await pending
        await msg.ack()
        await client.publish("sdk.job", "keep-me")
        while (held := await anext(first)).value != "keep-me":
            await held.ack()  # probes sent before the consumer was ready
        await first.aclose()  # leaves with "keep-me" unacked
        second = client.subscribe_durable("sdk.>", "sdk-workers")
        again = await asyncio.wait_for(anext(second), 10)
        assert (again.subject, again.value) == ("sdk.job", "keep-me")
        await again.ack()
        await second.aclose()
