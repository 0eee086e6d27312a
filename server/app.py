"""Composition root: settings -> backends -> services -> servicers -> grpc.aio server.

``running_server`` is an async context manager used by ``agentmesh serve``
and by the tests (port 0 picks a free port). Shutdown order (STYLE.md): health
NOT_SERVING, agents told to drain, wait for in-flight results up to the grace
period, stop the gRPC server, stop the scheduler, drain the bus, close the
backends in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import grpc
from a2a.types import a2a_pb2
from agentmesh.v1 import bus_pb2, discovery_pb2, state_pb2, task_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.aio import cancel_and_wait
from server.api.a2a.access import GatewayAccess
from server.api.a2a.access import security as a2a_security
from server.api.a2a.cards import mesh_card
from server.api.a2a.handler import MeshRequestHandler
from server.api.a2a.http import A2AServer
from server.api.auth import AccessInterceptor, StreamLimits, StreamQuota, TokenTable
from server.api.bus import BusServicer
from server.api.convert import Limits
from server.api.discovery import DiscoveryServicer
from server.api.handlers import generic_handler
from server.api.state import StateServicer
from server.api.tasks import TaskServicer
from server.api.tls import server_credentials
from server.backends.memory import (
    InMemoryAgentRegistry,
    InMemoryChunkStore,
    InMemoryStateStore,
    InMemoryTaskStore,
)
from server.backends.redis import RedisStores, parse_durability
from server.blob import open_blob_store
from server.bus import open_bus
from server.console import ConsoleServer, ConsoleServices
from server.domain.chunks import ChunkLimits
from server.domain.limits import DispatchLimits
from server.domain.models import DEFAULT_NAMESPACE, AgentState
from server.netutil import add_grpc_port, ensure_free
from server.observability.bus import MeteredBus
from server.observability.grpc_interceptors import ObservabilityInterceptor
from server.observability.metrics import MeshMetrics
from server.observability.observer import CompositeObserver, MetricsObserver
from server.observability.sampler import GaugeSampler
from server.observability.tracing import TracingObserver, server_interceptors, setup_tracing
from server.ports import (
    AgentFilter,
    AgentRegistry,
    ChunkStore,
    SnapshotSource,
    StateStore,
    TaskStore,
)
from server.services.approvals import HumanDesk
from server.services.breakers import BreakerConfig
from server.services.bulk import BulkActions
from server.services.chunks import TaskChunks
from server.services.clock import Clock, SystemClock
from server.services.messaging import Messaging
from server.services.registry import Registry
from server.services.scheduler import Scheduler, SchedulerConfig
from server.services.snapshots import SnapshotService
from server.services.state import StateService
from server.settings import REDIS_SCHEMES, Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"].full_name,
    task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
    state_pb2.DESCRIPTOR.services_by_name["StateService"].full_name,
    bus_pb2.DESCRIPTOR.services_by_name["BusService"].full_name,
)


@dataclass
class Mesh:
    """A running control plane (what tests and the CLI hold on to)."""

    settings: Settings
    address: str
    port: int
    scheduler: Scheduler
    registry: Registry
    state: StateService
    snapshots: SnapshotService
    metrics: MeshMetrics
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    stopping: asyncio.Event
    console: ConsoleServer | None = None
    """The web console, when it is on (``Settings.console_port_effective``)."""
    a2a_url: str = ""
    """The A2A gateway's URL ("" when it is off)."""

    async def drain(self, grace: float | None = None) -> None:
        """Graceful drain: NOT_SERVING, agents told to drain, wait for in-flight results."""
        grace = self.settings.drain_grace if grace is None else grace
        # Refuse new work first (UNAVAILABLE: clients fail over), then say NOT_SERVING.
        self.scheduler.drain_sessions()
        await self.health.enter_graceful_shutdown()
        told = await self.registry.drain_all("server shutting down", grace)
        log.info("draining: told %d agent(s); %d task(s) in flight", told,
                 self.scheduler.in_flight_local())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Bounded poll of a counter that many paths decrement.
        while self.scheduler.in_flight_local() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def open_stores(settings: Settings, stack: AsyncExitStack,
                      ) -> tuple[TaskStore, AgentRegistry, StateStore, ChunkStore]:
    """The stores named by ``settings.store``."""
    if settings.store in ("memory://", "memory", ""):
        agents = InMemoryAgentRegistry()  # the task store reads liveness from it to lease
        tasks = InMemoryTaskStore(agents=agents)
        return tasks, agents, InMemoryStateStore(), InMemoryChunkStore(tasks=tasks)
    if settings.store.startswith(REDIS_SCHEMES):
        stores = await RedisStores.connect(
            settings.store, prefix=settings.key_prefix,
            durability=parse_durability(settings.durability, settings.durability_timeout))
        stack.push_async_callback(stores.aclose)
        return stores.tasks, stores.agents, stores.state, stores.chunks
    raise ValueError(f"unknown store {settings.store!r}: use memory://, redis://host:port/db "
                     "or redis+cluster://host:port,host:port")


@asynccontextmanager
async def running_server(settings: Settings, *, clock: Clock | None = None,
                         metrics: MeshMetrics | None = None) -> AsyncIterator[Mesh]:
    """Start the whole control plane; drain and stop it on exit."""
    clock = clock or SystemClock()
    metrics = metrics or MeshMetrics()
    async with AsyncExitStack() as stack:
        tasks, agents, state_store, chunk_store = await open_stores(settings, stack)
        tracing = setup_tracing()  # off (and free) unless OTEL_* env vars ask for it
        bus = MeteredBus(await open_bus(settings.bus, prefix=settings.key_prefix,
                                        stream_replicas=settings.stream_replicas), metrics,
                         inject_trace=tracing)
        stack.push_async_callback(bus.aclose)
        stack.push_async_callback(bus.drain)
        metrics_observer = MetricsObserver(metrics)

        async def agent_alive(agent_id: str) -> bool:
            agent = await agents.get(agent_id)
            return agent is not None and agent.state is not AgentState.GONE

        state = StateService(state_store, bus, clock, agent_alive=agent_alive)
        scheduler = Scheduler(
            tasks, agents, bus, clock,
            config=SchedulerConfig(default_execution_timeout=settings.default_execution_timeout,
                            max_queued_per_namespace=settings.max_queued_per_namespace,
                            max_workflow_steps=settings.max_workflow_steps,
                            tick=settings.tick,
                            limits=DispatchLimits(
                                capability_limits=dict(settings.capability_limits),
                                key_label=settings.key_label,
                                key_limits=dict(settings.key_limits),
                                default_key_limit=settings.default_key_limit,
                                capability_rates=dict(settings.capability_rates)),
                            breaker=BreakerConfig(
                                fail_max=settings.breaker_fail_max,
                                reset_timeout=settings.breaker_reset_timeout),
                            heartbeat_interval=settings.heartbeat_interval,
                            heartbeat_misses=settings.heartbeat_misses,
                            drain_grace=settings.drain_grace),
            observer=CompositeObserver([metrics_observer, TracingObserver()]) if tracing
            else metrics_observer,
            release_locks=state.release_agent_locks)
        registry = Registry(agents, bus, clock, scheduler.leases)
        desk = HumanDesk(tasks, agents, bus, clock, leases=scheduler.leases,
                         task_events=scheduler.events, state=state,
                         timeout=settings.approval_timeout)
        chunks = TaskChunks(chunk_store, tasks, bus, clock, leases=scheduler.leases,
                            limits=ChunkLimits(max_chunk_bytes=settings.max_chunk_bytes,
                                               max_chunks_per_task=settings.max_chunks_per_task,
                                               retention=settings.chunk_retention))
        if not isinstance(tasks, SnapshotSource):  # pragma: no cover - every store is one
            raise TypeError(f"{type(tasks).__name__} cannot export snapshots")
        blob = open_blob_store(settings.blob, s3_endpoint=settings.s3_endpoint)
        stack.push_async_callback(blob.aclose)
        snapshots = SnapshotService(state_store, tasks, blob, bus, clock)
        messaging = Messaging(bus, max_pending=settings.max_watch_pending)
        bulk = BulkActions(scheduler)
        limits = Limits(max_payload_bytes=settings.max_payload_bytes,
                        max_message_bytes=settings.max_message_bytes,
                        max_watch_pending=settings.max_watch_pending)

        await scheduler.start()
        stack.push_async_callback(scheduler.stop)
        gauges = asyncio.create_task(GaugeSampler(
            metrics, scheduler, registry, lambda: metrics_observer.namespaces,
        ).run(settings.gauge_interval), name="metrics-gauges")

        async def stop_gauges() -> None:
            await cancel_and_wait(gauges)

        stack.push_async_callback(stop_gauges)
        desk_loop = asyncio.create_task(desk.run(), name="human-desk")

        async def stop_desk() -> None:
            await cancel_and_wait(desk_loop)

        stack.push_async_callback(stop_desk)
        if settings.snapshot_interval > 0:
            snapshotter = asyncio.create_task(snapshots.run_periodic(settings.snapshot_interval))

            async def stop_snapshotter() -> None:
                await cancel_and_wait(snapshotter)

            stack.push_async_callback(stop_snapshotter)

        # Server interceptors, outermost first: observability (metrics, tracing,
        # log context) wraps authentication, so refused calls are measured too.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservabilityInterceptor(metrics), *server_interceptors(tracing)]
        # Security (auth, roles, namespaces, stream quotas) stays innermost: last.
        tokens = TokenTable.load(settings.auth_file) if settings.auth_file else None
        credentials = server_credentials(settings.tls_cert, settings.tls_key,
                                         settings.tls_client_ca)
        # One count of open streams for gRPC watches and A2A streams alike.
        quota = StreamQuota(StreamLimits(
            max_watch_streams=settings.max_watch_streams,
            max_streams_per_principal=settings.max_streams_per_principal))
        interceptors.append(AccessInterceptor(tokens, quota=quota))
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Never share a port with another process (grpc's default is to
            # share: a second server on the same port would bind it silently).
            ("grpc.so_reuseport", 0),
        ])
        server.add_generic_rpc_handlers((
            generic_handler(discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"],
                            DiscoveryServicer(registry, limits,
                                              drain_grace=settings.drain_grace)),
            generic_handler(task_pb2.DESCRIPTOR.services_by_name["TaskService"],
                            TaskServicer(scheduler, registry, limits, chunks, desk, bulk=bulk)),
            generic_handler(state_pb2.DESCRIPTOR.services_by_name["StateService"],
                            StateServicer(state, limits, snapshots)),
            generic_handler(bus_pb2.DESCRIPTOR.services_by_name["BusService"],
                            BusServicer(messaging, limits)),
        ))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        # Both ports are bound before anything serves; one in use is a
        # PortInUseError naming it (server/netutil.py), raised from here. The
        # metrics port goes first: a gRPC port bound but never started stays
        # taken after stop() until the process ends.
        ensure_free(settings.host, settings.port, "gRPC")
        console_port = settings.console_port_effective
        if console_port is not None:
            ensure_free(settings.console_host, console_port, "console")
        metrics_server = None
        if settings.metrics_port:
            metrics_server = metrics.start_http_server(settings.metrics_port,
                                                       settings.metrics_host)
        try:
            port = add_grpc_port(server, settings.host, settings.port, credentials)
        except OSError:
            if metrics_server is not None:
                metrics_server.close()
            raise
        a2a = None
        a2a_url = ""
        if settings.a2a_listen_port:
            a2a_host = settings.a2a_host or settings.host
            a2a = a2a_gateway(scheduler, chunks, desk, registry, settings=settings,
                              host=a2a_host, tokens=tokens, quota=quota, limits=limits)
            try:
                a2a_port = a2a.bind()
            except OSError:
                if metrics_server is not None:
                    metrics_server.close()
                raise
            shown = "127.0.0.1" if a2a_host in ("0.0.0.0", "::", "") else a2a_host  # noqa: S104
            a2a_url = settings.a2a_public_url or f"{a2a.scheme}://{shown}:{a2a_port}/"
            a2a.url = a2a_url
        _warn_if_exposed(settings, authenticated=tokens is not None,
                         encrypted=credentials is not None)
        await server.start()
        if a2a is not None:
            await a2a.start()
            stack.push_async_callback(a2a.stop)
            log.info("A2A gateway on %s (agent card at %s.well-known/agent-card.json)",
                     a2a_url, a2a_url)
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        console = None
        if console_port is not None:
            # Same process, same service objects: the console reads and acts
            # through them, never through a store of its own.
            console = ConsoleServer(
                ConsoleServices(scheduler, registry, state, bulk, clock,
                                drain_grace=settings.drain_grace, desk=desk),
                bus, tokens=tokens, host=settings.console_host, port=console_port,
                tls_cert=settings.tls_cert, tls_key=settings.tls_key)
            try:
                await console.start()
            except OSError:
                await server.stop(grace=0)
                if metrics_server is not None:
                    metrics_server.close()
                raise
            if settings.console_host not in ("127.0.0.1", "::1", "localhost") and \
                    tokens is None:
                log.warning("SECURITY: the console listens on %s without authentication: "
                            "anyone who reaches it can re-drive, cancel and drain; use "
                            "--auth-file", settings.console_host)

        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104
        mesh = Mesh(settings, f"{host}:{port}", port, scheduler, registry, state, snapshots,
                    metrics,
                    server, health_servicer, asyncio.Event(), console, a2a_url)
        log.info("agentmesh serving on %s:%d (store=%s bus=%s)", settings.host, port,
                 settings.store, settings.bus)
        if settings.bus == "memory://" and settings.store != "memory://":
            log.warning("shared store with the in-process bus: fine for one replica, but "
                        "other replicas would not hear this one's events (new work, "
                        "cancellations, watches); use --bus nats://... to run several")
        try:
            yield mesh
        finally:
            with contextlib.suppress(Exception):
                if not mesh.stopping.is_set():
                    await mesh.drain(0.0)
            await server.stop(grace=1.0)
            if console is not None:
                await console.stop()
            if metrics_server is not None:
                metrics_server.close()
            log.info("agentmesh stopped")


def a2a_gateway(scheduler: Scheduler, chunks: TaskChunks, desk: HumanDesk, registry: Registry,
                *, settings: Settings, host: str, tokens: TokenTable | None,
                quota: StreamQuota | None = None,
                limits: Limits | None = None) -> A2AServer:
    """The A2A gateway over the mesh's services (not yet bound); with ``tokens``, callers
    are authenticated and authorized as over gRPC and the card declares the scheme."""
    try:
        version = importlib.metadata.version("agentmesh")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        version = "0"
    gateway: A2AServer

    async def card() -> a2a_pb2.AgentCard:
        agents = await registry.list(AgentFilter(DEFAULT_NAMESPACE,
                                                 states=frozenset({AgentState.ACTIVE})),
                                     after_id="", limit=10_000)
        out = mesh_card(agents, url=gateway.url, version=version)
        if access.enabled:
            a2a_security(out)
        return out

    access = GatewayAccess(tokens)
    handler = MeshRequestHandler(scheduler, chunks, desk, card=card, quota=quota,
                                 limits=limits)
    gateway = A2AServer(handler, card, host=host, port=settings.a2a_listen_port,
                        access=access, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
                        max_body_bytes=settings.max_message_bytes)
    return gateway


def _warn_if_exposed(settings: Settings, *, authenticated: bool, encrypted: bool) -> None:
    """Say loudly when a non-loopback listener (gRPC, or the A2A gateway, which takes the
    same tokens and TLS) lacks auth (or sends tokens in clear)."""
    listeners = [("", settings.host)]
    if settings.a2a_listen_port:
        listeners.append(("the A2A gateway ", settings.a2a_host or settings.host))
    for what, host in listeners:
        if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
            continue
        if not authenticated:
            log.warning("SECURITY: %slistening on %s without authentication: anyone who can "
                        "reach this address controls the mesh; use --auth-file (and "
                        "--tls-cert/--tls-key)", what, host)
        elif not encrypted:
            log.warning("SECURITY: %slistening on %s with tokens but without TLS: bearer "
                        "tokens travel in clear; use --tls-cert/--tls-key", what, host)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    import signal  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_server(settings) as mesh:
        await stop.wait()
        log.info("signal received: draining (grace %.1fs)", settings.drain_grace)
        mesh.stopping.set()
        await mesh.drain()
