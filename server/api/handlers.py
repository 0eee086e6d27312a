"""Registering servicers with a deserializer that never raises.

grpc answers a request it cannot parse with INTERNAL. We want INVALID_ARGUMENT
("garbage bytes"), so each method's deserializer returns a :class:`Malformed`
marker instead of raising, and the error wrappers turn it into
INVALID_ARGUMENT. The deserializer also holds every repeated and map field of
the request, at any depth, to its bound (``convert.REPEATED_BOUNDS``): past
one, it returns a :class:`Malformed` naming the field. Handlers are built from
the service descriptors, so every RPC of a service (and every message of a
stream) is covered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message

from server.api.convert import count_violation
from server.domain.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request message that could not be parsed, or that holds a list past its bound."""

    type_name: str
    error: str
    violation: FieldViolation | None = None
    """Set when the message parsed but a repeated or map field is past its bound."""


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            msg = cls.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc) or "cannot parse")
        violation = count_violation(msg)
        if violation is not None:
            return Malformed(cls.DESCRIPTOR.full_name,
                             f"{violation.field}: {violation.description}", violation)
        return msg
    return parse


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


def generic_handler(service: descriptor.ServiceDescriptor,
                    servicer: object) -> grpc.GenericRpcHandler:
    """A generic handler for every method of ``service`` implemented by ``servicer``."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        deser = _deserializer(message_factory.GetMessageClass(method.input_type))
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(
                impl, request_deserializer=deser, response_serializer=_serialize)
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                impl, request_deserializer=deser, response_serializer=_serialize)
        elif method.client_streaming:
            handler = grpc.stream_unary_rpc_method_handler(
                impl, request_deserializer=deser, response_serializer=_serialize)
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                impl, request_deserializer=deser, response_serializer=_serialize)
        handlers[method.name] = handler
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
