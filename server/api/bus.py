"""BusService servicer: thin, converts and delegates to Messaging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentmesh.v1 import bus_pb2, bus_pb2_grpc

from server.api import convert, errors
from server.api.convert import Limits
from server.domain.errors import InvalidArgumentError
from server.services.messaging import Messaging

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
