"""BusService subjects on the NATS wire: ``<prefix>.<namespace>.<subject>``.

A peer in any language can use NATS directly instead of BusService: what one
publishes through the mesh, the other receives on the documented subject, and
back. With the default key prefix the subjects are ``agentmesh.<namespace>.``.
"""

from __future__ import annotations

import asyncio

import grpc
import nats
from agentmesh.v1 import bus_pb2, bus_pb2_grpc, common_pb2

from server.app import running_server
from tests._services import require_nats, unique_prefix
from tests.conftest import embedded_settings


async def test_bus_service_subjects_are_prefix_namespace_subject() -> None:
    url = require_nats()
    prefix = unique_prefix("wire")
    async with running_server(embedded_settings(bus=url, key_prefix=prefix)) as mesh:
        raw = await nats.connect(url)
        try:
            seen: asyncio.Queue[nats.aio.msg.Msg] = asyncio.Queue()
            await raw.subscribe(f"{prefix}.team-a.reports.>", cb=seen.put)
            await raw.flush()
            async with grpc.aio.insecure_channel(mesh.address) as channel:
                bus = bus_pb2_grpc.BusServiceStub(channel)
                message = bus_pb2.BusMessage(subject="reports.daily",
                                             payload=common_pb2.Payload(data=b"hi"))
                await bus.Publish(bus_pb2.PublishRequest(namespace="team-a", message=message))
                msg = await asyncio.wait_for(seen.get(), 10)
                assert (msg.subject, msg.data) == (f"{prefix}.team-a.reports.daily", b"hi")

                # and a plain NATS publish reaches a BusService subscriber
                stream = bus.Subscribe(bus_pb2.SubscribeRequest(namespace="team-a",
                                                                subject="orders.*"))
                first = asyncio.ensure_future(stream.read())
                for _ in range(100):  # until the subscription is in place on the server
                    await raw.publish(f"{prefix}.team-a.orders.new", b"o1")
                    await raw.flush()
                    done, _ = await asyncio.wait({first}, timeout=0.1)
                    if done:
                        break
                got = await asyncio.wait_for(first, 10)
                assert (got.message.subject, got.message.payload.data) == ("orders.new", b"o1")
                stream.cancel()
        finally:
            await raw.close()
