"""StateService servicer: thin, converts and delegates to StateService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentmesh.v1 import state_pb2, state_pb2_grpc

from server.api import convert, errors
from server.api.convert import Limits
from server.domain.errors import InvalidArgumentError, NotFoundError
from server.domain.models import StateEventType
from server.services.state import StateService

Ctx = grpc.aio.ServicerContext[Any, Any]


class StateServicer(state_pb2_grpc.StateServiceServicer):
    """gRPC face of the versioned KV."""

    def __init__(self, state: StateService, limits: Limits) -> None:
        self._state = state
        self._limits = limits

    @errors.unary
    async def Get(self, request: state_pb2.GetRequest, context: Ctx) -> state_pb2.GetResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        entry = await self._state.get(ns, key)
        if entry is None:
            raise NotFoundError("key", key)
        return state_pb2.GetResponse(entry=convert.entry_to_proto(entry))

    @errors.unary
    async def Put(self, request: state_pb2.PutRequest, context: Ctx) -> state_pb2.PutResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        value = convert.payload(request.value, "value", self._limits)
        expected = request.expected_version if request.HasField("expected_version") else None
        if expected is not None and expected < 0:
            raise InvalidArgumentError.field("expected_version", "must not be negative")
        ttl = convert.duration(request.ttl, "ttl")
        entry = await self._state.put(ns, key, value, expected_version=expected, ttl=ttl)
        return state_pb2.PutResponse(entry=convert.entry_to_proto(entry, with_value=False))

    @errors.unary
    async def Delete(self, request: state_pb2.DeleteRequest,
                     context: Ctx) -> state_pb2.DeleteResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        key = convert.state_key(request.key, self._limits)
        expected = request.expected_version if request.HasField("expected_version") else None
        revision = await self._state.delete(ns, key, expected_version=expected)
        return state_pb2.DeleteResponse(revision=revision)

    @errors.unary
    async def List(self, request: state_pb2.ListRequest, context: Ctx) -> state_pb2.ListResponse:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        size = convert.page_size(request.page_size)
        prefix = convert.state_prefix(request.prefix, self._limits)
        fkey = f"{ns}|{prefix}"
        after = convert.decode_page_token(request.page_token, fkey)
        entries = await self._state.list(ns, prefix, after_key=str(after or ""), limit=size + 1)
        token = (convert.encode_page_token(entries[size - 1].key, fkey)
                 if len(entries) > size else "")
        return state_pb2.ListResponse(
            entries=[convert.entry_to_proto(e) for e in entries[:size]], next_page_token=token)

    @errors.streaming
    async def Watch(self, request: state_pb2.WatchRequest,
                    context: Ctx) -> AsyncIterator[state_pb2.WatchResponse]:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        prefix = convert.state_prefix(request.prefix, self._limits)
        if request.after_revision < 0:
            raise InvalidArgumentError.field("after_revision", "must not be negative")
        async for event in self._state.watch(ns, prefix, request.after_revision):
            yield state_pb2.WatchResponse(
                type=(state_pb2.STATE_EVENT_TYPE_PUT if event.type is StateEventType.PUT
                      else state_pb2.STATE_EVENT_TYPE_DELETE),
                entry=convert.entry_to_proto(event.entry))
