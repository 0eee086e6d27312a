"""Prometheus metrics for the control plane.

Every metric the mesh exports is created here, on one `CollectorRegistry` per
`MeshMetrics` instance (never the process-global registry), so tests can build
as many as they like. The metric names and label sets are a contract shared
with ``deploy/observability`` (dashboards, alert rules): change them only
together with those files.

Labels are bounded on purpose: namespaces, capabilities, agent display names,
gRPC method names, status codes and a few fixed enumerations. Task, workflow
and trace ids never become labels; they belong in logs and traces.

Gauges that mirror the shared store (queue depth, agents, autonomy) are set by
every replica from the same source of truth, so queries aggregate them with
``max`` across instances rather than ``sum``.
"""

from __future__ import annotations

import errno
import threading
from importlib import metadata
from typing import Any, Final, Literal, Self, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _prom_start_http_server

from server.netutil import PortInUseError

__all__ = [
    "DURATION_BUCKETS",
    "AgentState",
    "BreakerState",
    "MeshMetrics",
    "MetricsServer",
    "QueueState",
    "TaskOutcome",
]

TaskOutcome = Literal["succeeded", "failed", "cancelled", "dead_lettered"]
"""How a task ended, the ``outcome`` label."""

QueueState = Literal["pending", "queued", "running", "retrying"]
"""Non-terminal task states counted by ``agentmesh_queue_depth``."""

AgentState = Literal["active", "draining", "gone"]
"""Agent states counted by ``agentmesh_agents``."""

BreakerState = Literal["closed", "half-open", "open"]
"""Circuit-breaker states, named as pybreaker names them."""

_OUTCOMES: Final = frozenset(get_args(TaskOutcome))
_QUEUE_STATES: Final = frozenset(get_args(QueueState))
_AGENT_STATES: Final = frozenset(get_args(AgentState))
_BREAKER_VALUES: Final[dict[str, int]] = {"closed": 0, "half-open": 1, "open": 2}

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
)
"""Histogram buckets from 5 ms to 30 min: dispatch waits, task runs and RPCs."""

_RPC_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""RPC buckets: unary calls are milliseconds; streams may last minutes."""


def _package_version() -> str:
    try:
        return metadata.version("agentmesh")
    except metadata.PackageNotFoundError:
        return "unknown"


def _check(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        msg = f"unknown {what} {value!r}; expected one of {sorted(allowed)}"
        raise ValueError(msg)


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; `close` stops it (safe to repeat)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        """Wrap the server and thread returned by prometheus-client."""
        self._server = server
        self._thread = thread
        self._closed = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound TCP port (useful when started on port 0)."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving, close the socket and join the serving thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    shutdown = close

    def __enter__(self) -> Self:
        """Return self; the server is already running."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the server."""
        self.close()


class MeshMetrics:
    """All agentmesh Prometheus metrics, registered on one registry.

    The helper methods are the only way the server records metrics, so label
    values are validated in one place. Enumerated labels (outcome, state)
    raise `ValueError` on unknown values rather than growing cardinality.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str | None = None,
    ) -> None:
        """Create every metric on ``registry`` (a fresh registry by default).

        ``version`` labels ``agentmesh_build_info``; by default it is the
        installed distribution's version.
        """
        self.registry: Final[CollectorRegistry] = (
            registry if registry is not None else CollectorRegistry(auto_describe=True)
        )
        r = self.registry
        self._lock = threading.Lock()
        self._breaker_keys: set[tuple[str, str]] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

        self.tasks_submitted_total: Final = Counter(
            "agentmesh_tasks_submitted",
            "Tasks accepted by SubmitTask or as workflow steps.",
            ["namespace", "capability"],
            registry=r,
        )
        self.tasks_finished_total: Final = Counter(
            "agentmesh_tasks_finished",
            "Tasks that reached a terminal state, by outcome.",
            ["namespace", "capability", "outcome"],
            registry=r,
        )
        self.dispatch_latency_seconds: Final = Histogram(
            "agentmesh_task_dispatch_latency_seconds",
            "Time from QUEUED to RUNNING (assignment to an agent).",
            ["capability"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.run_duration_seconds: Final = Histogram(
            "agentmesh_task_run_duration_seconds",
            "Time from RUNNING to the end of the attempt, by outcome.",
            ["capability", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_depth: Final = Gauge(
            "agentmesh_queue_depth",
            "Non-terminal tasks by state (mirrors the shared store).",
            ["namespace", "capability", "state"],
            registry=r,
        )
        self.agents: Final = Gauge(
            "agentmesh_agents",
            "Registered agents by state (mirrors the shared store).",
            ["namespace", "state"],
            registry=r,
        )
        self.capability_agents: Final = Gauge(
            "agentmesh_capability_agents",
            "Live (active) agents offering a capability (mirrors the shared store).",
            ["namespace", "capability"],
            registry=r,
        )
        self.agent_in_flight: Final = Gauge(
            "agentmesh_agent_in_flight",
            "Tasks currently leased to an agent (by display name).",
            ["agent"],
            registry=r,
        )
        self.task_retries_total: Final = Counter(
            "agentmesh_task_retries",
            "Retries scheduled after a failed attempt or an expired lease.",
            ["capability"],
            registry=r,
        )
        self.dead_letters_total: Final = Counter(
            "agentmesh_dead_letters",
            "Tasks dead-lettered after exhausting their retries.",
            ["capability"],
            registry=r,
        )
        self.stale_results_total: Final = Counter(
            "agentmesh_stale_results",
            "Results refused because they carried a stale lease token.",
            ["capability"],
            registry=r,
        )
        self.breaker_state: Final = Gauge(
            "agentmesh_breaker_state",
            "Circuit breaker per agent and capability: 0 closed, 1 half-open, 2 open.",
            ["agent", "capability"],
            registry=r,
        )
        self.autonomy_ratio: Final = Gauge(
            "agentmesh_autonomy_ratio",
            "Tasks that succeeded with no human action / all tasks that ended.",
            ["namespace"],
            registry=r,
        )
        self.bus_published_total: Final = Counter(
            "agentmesh_bus_messages_published",
            "Messages published on the bus, by kind.",
            ["kind"],
            registry=r,
        )
        self.bus_delivered_total: Final = Counter(
            "agentmesh_bus_messages_delivered",
            "Messages delivered from the bus to local subscribers, by kind.",
            ["kind"],
            registry=r,
        )
        self.grpc_requests_total: Final = Counter(
            "agentmesh_grpc_requests",
            "gRPC calls handled, by full method name and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_duration_seconds: Final = Histogram(
            "agentmesh_grpc_request_duration_seconds",
            "gRPC call duration (streams: the stream's lifetime).",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.build_info: Final = Gauge(
            "agentmesh_build_info",
            "Always 1; the version label says what is running.",
            ["version"],
            registry=r,
        )
        self.build_info.labels(version or _package_version()).set(1)

    # Tasks -----------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached: ``labels()`` is costly on the hot path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def task_submitted(self, namespace: str, capability: str) -> None:
        """Count one accepted task."""
        self._child(self.tasks_submitted_total, namespace, capability).inc()

    def task_finished(
        self,
        namespace: str,
        capability: str,
        outcome: TaskOutcome,
        run_seconds: float | None = None,
    ) -> None:
        """Count a task that reached a terminal state.

        ``run_seconds`` is the last attempt's running time; pass None for a
        task that never ran (cancelled while queued), so the run-duration
        histogram only holds real runs.
        """
        _check(outcome, _OUTCOMES, "outcome")
        self._child(self.tasks_finished_total, namespace, capability, outcome).inc()
        if run_seconds is not None:
            self._child(self.run_duration_seconds, capability, outcome).observe(
                max(run_seconds, 0.0))

    def task_dispatched(self, capability: str, wait_seconds: float) -> None:
        """Record the QUEUED -> RUNNING wait of one assignment."""
        self._child(self.dispatch_latency_seconds, capability).observe(max(wait_seconds, 0.0))

    def set_queue_depth(self, namespace: str, capability: str, state: QueueState, n: int) -> None:
        """Set how many tasks of a namespace and capability are in ``state``.

        The server's periodic gauges pass ``capability=""`` (the label is then
        absent): the stores count per namespace and state only.
        """
        _check(state, _QUEUE_STATES, "queue state")
        self.queue_depth.labels(namespace, capability, state).set(n)

    def retry_scheduled(self, capability: str) -> None:
        """Count one retry put on the backoff timer."""
        self._child(self.task_retries_total, capability).inc()

    def dead_lettered(self, capability: str) -> None:
        """Count one task moved to DEAD_LETTERED.

        This does not count the task as finished; the caller also calls
        `task_finished` with ``outcome="dead_lettered"``.
        """
        self.dead_letters_total.labels(capability).inc()

    def stale_result(self, capability: str) -> None:
        """Count one result refused for carrying a stale fencing token."""
        self.stale_results_total.labels(capability).inc()

    def set_autonomy(self, namespace: str, ratio: float) -> None:
        """Set a namespace's autonomy ratio (0..1)."""
        if not 0.0 <= ratio <= 1.0:
            msg = f"autonomy ratio must be within [0, 1], got {ratio!r}"
            raise ValueError(msg)
        self.autonomy_ratio.labels(namespace).set(ratio)

    # Agents ----------------------------------------------------------------

    def set_agents(self, namespace: str, state: AgentState, n: int) -> None:
        """Set how many agents of a namespace are in ``state``."""
        _check(state, _AGENT_STATES, "agent state")
        self.agents.labels(namespace, state).set(n)

    def set_capability_agents(self, namespace: str, capability: str, n: int) -> None:
        """Set how many live agents of a namespace offer ``capability``."""
        self.capability_agents.labels(namespace, capability).set(n)

    def set_in_flight(self, agent: str, n: int) -> None:
        """Set how many tasks are leased to ``agent`` (its display name)."""
        self.agent_in_flight.labels(agent).set(n)

    def set_breaker(self, agent: str, capability: str, state: BreakerState) -> None:
        """Record the state of the breaker guarding ``agent`` for ``capability``."""
        try:
            value = _BREAKER_VALUES[state]
        except KeyError:
            msg = f"unknown breaker state {state!r}; expected one of {sorted(_BREAKER_VALUES)}"
            raise ValueError(msg) from None
        with self._lock:
            self._breaker_keys.add((agent, capability))
        self.breaker_state.labels(agent, capability).set(value)

    def remove_agent(self, agent: str) -> None:
        """Drop every per-agent series, so departed agents do not linger."""
        with self._lock:
            keys = [k for k in self._breaker_keys if k[0] == agent]
            self._breaker_keys.difference_update(keys)
        for key in keys:
            _remove(self.breaker_state, *key)
        _remove(self.agent_in_flight, agent)

    # Bus and RPC -----------------------------------------------------------

    def bus_published(self, kind: str) -> None:
        """Count one message published on the bus."""
        self._child(self.bus_published_total, kind).inc()

    def bus_delivered(self, kind: str) -> None:
        """Count one message delivered to a local subscriber."""
        self._child(self.bus_delivered_total, kind).inc()

    def grpc_request(self, method: str, code: str, seconds: float) -> None:
        """Record one finished gRPC call.

        ``method`` is the full method name (``/agentmesh.v1.TaskService/GetTask``)
        and ``code`` the status code name (``grpc.StatusCode.OK.name``).
        """
        self._child(self.grpc_requests_total, method, code).inc()
        self._child(self.grpc_duration_seconds, method).observe(max(seconds, 0.0))

    # Exposition ------------------------------------------------------------

    def start_http_server(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve this registry on ``http://host:port/metrics`` from a daemon thread.

        Port 0 picks a free port (read it from `MetricsServer.port`). In a
        container, pass ``host="0.0.0.0"`` so Prometheus can reach it. A port
        in use is a `PortInUseError` naming it (prometheus_client's server
        binds with ``SO_REUSEADDR`` only, so the bind itself refuses it).
        """
        try:
            server, thread = _prom_start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(port, "metrics", host) from None
            raise
        return MetricsServer(server, thread)


def _remove(metric: Gauge, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        return
