"""DiscoveryService servicer: thin, converts and delegates to the Registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import grpc
from agentmesh.v1 import discovery_pb2, discovery_pb2_grpc

from server.api import auth, convert, errors
from server.api.convert import Limits
from server.api.streams import Duplex, first_message
from server.domain.errors import FailedPreconditionError, InvalidArgumentError
from server.domain.models import AgentState
from server.ports import AgentFilter
from server.services.registry import Registry
from server.services.sessions import HeartbeatSession, SessionEnded

Ctx = grpc.aio.ServicerContext[Any, Any]
_LIVE = frozenset({AgentState.ACTIVE, AgentState.DRAINING})


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    """gRPC face of the agent registry."""

    def __init__(self, registry: Registry, limits: Limits, *,
                 drain_grace: float = 10.0) -> None:
        self._registry = registry
        self._limits = limits
        self._drain_grace = drain_grace

    @errors.unary
    async def RegisterAgent(self, request: discovery_pb2.RegisterAgentRequest,
                            context: Ctx) -> discovery_pb2.RegisterAgentResponse:
        """See the proto."""
        card = convert.agent_from_register(request, self._limits)
        card = replace(card, labels=auth.agent_labels(card.labels))
        agent = await self._registry.register(card)
        return discovery_pb2.RegisterAgentResponse(
            agent=convert.agent_to_proto(agent), session_token=agent.session_token,
            heartbeat_interval=convert.to_duration(self._registry.config.heartbeat_interval),
            expire_time=convert.to_timestamp(agent.expire_time))

    @errors.unary
    async def DrainAgent(self, request: discovery_pb2.DrainAgentRequest,
                         context: Ctx) -> discovery_pb2.DrainAgentResponse:
        """Audited (``drain``) with its outcome."""
        agent_id = convert.resource_id(request.name, "agents")
        grace = convert.duration(request.grace_period, "grace_period") or self._drain_grace
        reason = request.reason[:1024] or "drained by an operator"
        before = await self._registry.get(agent_id)
        auth.require_visible(before.namespace, "agent", f"agents/{agent_id}")
        with auth.audited("drain", f"agents/{agent_id}", before.namespace):
            agent = await self._registry.drain(agent_id, reason, grace)
        return discovery_pb2.DrainAgentResponse(agent=convert.agent_to_proto(agent))

    @errors.unary
    async def GetAgent(self, request: discovery_pb2.GetAgentRequest,
                       context: Ctx) -> discovery_pb2.GetAgentResponse:
        """See the proto."""
        agent = await self._registry.get(convert.resource_id(request.name, "agents"))
        auth.require_visible(agent.namespace, "agent", f"agents/{agent.id}")
        return discovery_pb2.GetAgentResponse(agent=convert.agent_to_proto(agent))

    @errors.unary
    async def ListAgents(self, request: discovery_pb2.ListAgentsRequest,
                         context: Ctx) -> discovery_pb2.ListAgentsResponse:
        """See the proto."""
        size = convert.page_size(request.page_size)
        ns = convert.namespace(request.namespace)
        state = convert.agent_state(request.state)
        cap = convert.capability(request.capability, "capability", required=False)
        labels = convert.labels(request.labels, "labels", self._limits)
        fkey = f"{ns}|{cap}|{request.state}|{sorted(labels.items())}"
        after = convert.decode_page_token(request.page_token, fkey, convert.Cursor.ID)
        flt = AgentFilter(ns, cap, frozenset({state}) if state else _LIVE, labels)
        agents = await self._registry.list(flt, after_id=after, limit=size + 1)
        token = convert.encode_page_token(agents[size - 1].id, fkey) if len(agents) > size else ""
        return discovery_pb2.ListAgentsResponse(
            agents=[convert.agent_to_proto(a) for a in agents[:size]], next_page_token=token)

    @errors.unary
    async def DeregisterAgent(self, request: discovery_pb2.DeregisterAgentRequest,
                              context: Ctx) -> discovery_pb2.DeregisterAgentResponse:
        """See the proto."""
        agent_id = convert.resource_id(request.name, "agents")
        who = auth.caller()
        if who is not None:
            agent = await self._registry.get(agent_id)
            auth.require_visible(agent.namespace, "agent", f"agents/{agent_id}")
            if who.is_admin and agent.labels.get(auth.PRINCIPAL_LABEL) != who.name:
                # An admin ends another principal's agent session without its token.
                with auth.audited("deregister", f"agents/{agent_id}", agent.namespace):
                    await self._registry.mark_gone(agent_id, f"deregistered by {who.name}")
                return discovery_pb2.DeregisterAgentResponse()
            auth.check_agent_identity(agent.labels, f"agents/{agent_id}")
        await self._registry.deregister(agent_id, request.session_token)
        return discovery_pb2.DeregisterAgentResponse()

    @errors.streaming
    async def Heartbeat(self, request_iterator: AsyncIterator[discovery_pb2.HeartbeatRequest],
                        context: Ctx) -> AsyncIterator[discovery_pb2.HeartbeatResponse]:
        """See the proto."""
        first = await first_message(request_iterator, "open", "open")
        agent_id = convert.resource_id(first.open.agent, "agents", "open.agent")
        agent = await self._registry.authenticate(agent_id, first.open.session_token)
        auth.check_agent_identity(agent.labels, f"agents/{agent.id}")
        interval = convert.to_duration(self._registry.config.heartbeat_interval)

        async def handle(req: discovery_pb2.HeartbeatRequest) -> None:
            if req.WhichOneof("kind") != "beat":
                raise InvalidArgumentError.field("open", "sent twice")
            beat = await self._registry.beat(agent_id, max(0, req.beat.in_flight),
                                             min(max(req.beat.load, 0.0), 1.0))
            duplex.send(discovery_pb2.HeartbeatResponse(ack=discovery_pb2.HeartbeatAck(
                expire_time=convert.to_timestamp(beat.expire_time),
                heartbeat_interval=interval)))

        def send_drain(reason: str, grace_period: float, leave: bool) -> None:
            duplex.send(discovery_pb2.HeartbeatResponse(drain=discovery_pb2.DrainDirective(
                reason=reason, grace_period=convert.to_duration(grace_period), leave=leave)))

        ended: list[SessionEnded] = []

        def end(why: SessionEnded) -> None:
            ended.append(why)
            duplex.send(None)

        duplex: Duplex[discovery_pb2.HeartbeatRequest, discovery_pb2.HeartbeatResponse] = Duplex(
            request_iterator, handle, max_outbox=64)
        session = HeartbeatSession(agent_id, send_drain, end)
        attached = await self._registry.attach(session)
        try:
            yield discovery_pb2.HeartbeatResponse(ack=discovery_pb2.HeartbeatAck(
                expire_time=convert.to_timestamp(attached.expire_time),
                heartbeat_interval=interval))
            async for response in duplex.responses():
                yield response
            if ended:
                # The server ended the session (missed beats, deregistered by an
                # admin): say so with a status, not a quiet end of stream.
                raise FailedPreconditionError(ended[0].message, reason=ended[0].reason)
        finally:
            await self._registry.detach(session, "heartbeat stream closed")

    @errors.streaming
    async def WatchAgents(self, request: discovery_pb2.WatchAgentsRequest,
                          context: Ctx) -> AsyncIterator[discovery_pb2.WatchAgentsResponse]:
        """See the proto."""
        ns = convert.namespace(request.namespace)
        cap = convert.capability(request.capability, "capability", required=False)
        async for event in self._registry.watch(ns, cap,
                                                include_existing=request.include_existing,
                                                max_pending=self._limits.max_watch_pending):
            yield discovery_pb2.WatchAgentsResponse(
                type=int(event.type), agent=convert.agent_to_proto(event.agent),  # type: ignore[arg-type]
                event_time=convert.to_timestamp(event.time))
