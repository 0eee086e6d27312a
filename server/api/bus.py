"""BusService servicer: thin, converts and delegates to Messaging."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentmesh.v1 import bus_pb2, bus_pb2_grpc

from server.api import auth, convert, errors, streams
from server.api.convert import Limits
from server.domain.errors import FailedPreconditionError, InvalidArgumentError
from server.services.messaging import DurableReceiver, Messaging

DURABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_IN_FLIGHT, MAX_IN_FLIGHT = 100, 10_000

Ctx = grpc.aio.ServicerContext[Any, Any]


class BusServicer(bus_pb2_grpc.BusServiceServicer):
    """gRPC face of the message bus."""

    def __init__(self, messaging: Messaging, limits: Limits) -> None:
        self._messaging = messaging
        self._limits = limits

    @errors.unary
    async def Publish(self, request: bus_pb2.PublishRequest,
                      context: Ctx) -> bus_pb2.PublishResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        if not request.HasField("message"):
            raise InvalidArgumentError.field("message", "required")
        msg = request.message
        subj = convert.subject(msg.subject)
        value = convert.payload(msg.payload, "message.payload", self._limits)
        hdrs = convert.headers(msg.headers, self._limits)
        hdrs.update(convert.payload_headers(value))
        await self._messaging.publish(ns, subj, value.data, hdrs)
        return bus_pb2.PublishResponse()

    @errors.streaming
    async def Subscribe(self, request: bus_pb2.SubscribeRequest,
                        context: Ctx) -> AsyncIterator[bus_pb2.SubscribeResponse]:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        pattern = convert.subject_pattern(request.subject)
        group = request.queue_group
        if group and not convert.SUBJECT_RE.match(group):
            raise InvalidArgumentError.field("queue_group", "letters, digits, '_', '-', '.'")
        async for message in self._messaging.subscribe(ns, pattern, group):
            yield bus_pb2.SubscribeResponse(message=convert.bus_message_to_proto(
                message.subject, message.data, message.headers, message.publish_time))

    @errors.streaming
    async def SubscribeDurable(
            self, request_iterator: AsyncIterator[bus_pb2.SubscribeDurableRequest], context: Ctx,
    ) -> AsyncIterator[bus_pb2.SubscribeDurableResponse]:
        """See the proto."""
        first = await streams.first_message(request_iterator, "open", "open")
        opened = first.open
        ns = convert.namespace(opened.namespace, "open.namespace")
        denied = auth.namespace_denied(auth.caller(), ns)  # a stream: checked here
        if denied is not None:
            raise denied
        pattern = convert.subject_pattern(opened.subject, "open.subject")
        if not DURABLE_NAME_RE.match(opened.durable_name):
            raise InvalidArgumentError.field(
                "open.durable_name", "1-64 letters, digits, '-' or '_'")
        if opened.max_in_flight < 0:
            raise InvalidArgumentError.field("open.max_in_flight", "must not be negative")
        in_flight = min(opened.max_in_flight or DEFAULT_IN_FLIGHT, MAX_IN_FLIGHT)
        try:
            receiver = await self._messaging.subscribe_durable(ns, pattern,
                                                               opened.durable_name, in_flight)
        except ValueError as exc:  # the consumer exists with another pattern
            raise FailedPreconditionError(str(exc), reason="DURABLE_PATTERN") from None
        await context.send_initial_metadata(())  # the consumer exists: see the proto
        acks = asyncio.create_task(_read_acks(request_iterator, receiver))
        # The request side ended (half-close, a bad message): end the deliveries too.
        closing: set[asyncio.Task[None]] = set()
        acks.add_done_callback(lambda _: closing.add(asyncio.create_task(receiver.close())))
        try:
            async for delivery, message in receiver.deliveries():
                yield bus_pb2.SubscribeDurableResponse(
                    delivery_id=delivery, message=convert.bus_message_to_proto(
                        message.subject, message.data, message.headers, message.publish_time))
            error = acks.exception() if acks.done() and not acks.cancelled() else None
            if error is not None:
                raise error
        finally:
            acks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acks
            await receiver.close()


async def _read_acks(requests: AsyncIterator[bus_pb2.SubscribeDurableRequest],
                     receiver: DurableReceiver) -> None:
    """Apply the stream's acks until it half-closes; a non-ack message is refused."""
    async for request in requests:
        errors.check(request)
        if request.WhichOneof("kind") != "ack":
            raise InvalidArgumentError.field("ack", "after `open`, send only `ack` messages")
        await receiver.ack(request.ack.delivery_ids)
