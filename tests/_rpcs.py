"""Every RPC of the mesh, enumerated from the proto descriptors, and a raw caller.

Shared by the auth and fuzz suites: a new RPC is picked up by both without
editing them (and the auth table test fails until it has a rule).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from agentmesh.v1 import bus_pb2, discovery_pb2, state_pb2, task_pb2
from google.protobuf import descriptor, message_factory
from google.protobuf.message import Message

SERVICES = tuple(
    module.DESCRIPTOR.services_by_name[name]
    for module, name in ((discovery_pb2, "DiscoveryService"), (task_pb2, "TaskService"),
                         (state_pb2, "StateService"), (bus_pb2, "BusService")))


@dataclass(frozen=True)
class Rpc:
    """One method of one service."""

    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        """The full method name, "/pkg.Service/Method"."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        """Service.Method."""
        return f"{self.method.containing_service.name}.{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        """Whether the client sends a stream."""
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        """Whether the server answers with a stream."""
        return bool(self.method.server_streaming)

    def request_class(self) -> type[Message]:
        """The generated class of the request message."""
        return message_factory.GetMessageClass(self.method.input_type)


ALL_RPCS: tuple[Rpc, ...] = tuple(Rpc(m) for s in SERVICES for m in s.methods)


CLOSED_WHILE_WRITING = "CLOSED_WHILE_WRITING"
"""call_raw's answer when the server ended a stream before all requests were written."""


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


async def call_raw(ch: grpc.aio.Channel, rpc: Rpc, bodies: Sequence[bytes], *,
                   metadata: Sequence[tuple[str, str]] = (), deadline: float = 2.0,
                   read: int = 1, close_writes: bool = True) -> grpc.StatusCode | str:
    """Send raw request bytes, read up to ``read`` responses; return the final status.

    A stream that is still open after its responses were read (a watch with
    nothing to say) is cancelled and reported as OK: the server accepted it.
    """
    md = tuple(metadata)
    try:
        if not rpc.client_streaming and not rpc.server_streaming:
            await ch.unary_unary(rpc.path)(bodies[0] if bodies else b"", metadata=md,
                                           timeout=deadline)
            return grpc.StatusCode.OK
        if not rpc.client_streaming:
            stream = ch.unary_stream(rpc.path)(bodies[0] if bodies else b"", metadata=md,
                                               timeout=deadline)
        else:
            stream = ch.stream_stream(rpc.path)(metadata=md, timeout=deadline)
            try:
                for body in bodies:
                    await stream.write(body)
                if close_writes:
                    await stream.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and "from Core" in (exc.details() or ""):
                    # The server ended the call while we were still writing: grpc
                    # fails the write locally ("Internal error from Core"); the
                    # server's own status is lost to the client. Not a server answer.
                    return CLOSED_WHILE_WRITING
                return await stream.code()
        got = 0
        try:
            async with asyncio.timeout(min(0.5, deadline)):
                while got < read:
                    item = await stream.read()
                    if item is grpc.aio.EOF:
                        break
                    got += 1
        except TimeoutError:
            stream.cancel()
            return grpc.StatusCode.OK
        if got >= read:
            stream.cancel()
            return grpc.StatusCode.OK
        return await stream.code()
    except grpc.aio.AioRpcError as err:
        return err.code()
