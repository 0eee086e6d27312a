"""Optional Prometheus metrics of an agent process's handlers (off by default).

Set ``AGENTMESH_AGENT_METRICS_PORT`` (e.g. ``9465``; ``0`` or unset: off) and
the first handler run starts a ``/metrics`` endpoint on that port
(``AGENTMESH_AGENT_METRICS_HOST``, default ``127.0.0.1``) exporting:

- ``agentmesh_agent_handler_runs_total{capability, outcome}``: outcome is
  ``succeeded``, ``failed`` or ``cancelled``;
- ``agentmesh_agent_handler_duration_seconds{capability}``: handler run time.

Labels are the capability names the agent registered and a fixed outcome
set, so cardinality stays bounded. Metrics live on their own registry; when
off, nothing is imported or created.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger(__name__)

__all__ = ["HandlerMetrics", "HandlerOutcome", "handler_metrics"]

HandlerOutcome = Literal["succeeded", "failed", "cancelled"]
"""How a handler run ended (the ``outcome`` label)."""

_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0)

_lock = threading.Lock()
_instance: HandlerMetrics | None = None
_decided = False


class HandlerMetrics:
    """Handler run counters and durations on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the metrics on ``registry`` (a fresh one by default)."""
        from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: PLC0415

        self.registry: CollectorRegistry = registry or CollectorRegistry()
        self.runs: Counter = Counter(
            "agentmesh_agent_handler_runs", "Handler runs of this agent process, by outcome.",
            ["capability", "outcome"], registry=self.registry)
        self.duration: Histogram = Histogram(
            "agentmesh_agent_handler_duration_seconds", "Handler run time.",
            ["capability"], buckets=_BUCKETS, registry=self.registry)

    def observe(self, capability: str, outcome: HandlerOutcome, seconds: float) -> None:
        """Record one handler run."""
        self.runs.labels(capability, outcome).inc()
        self.duration.labels(capability).observe(max(seconds, 0.0))


def handler_metrics() -> HandlerMetrics | None:
    """The process's handler metrics, or None when ``AGENTMESH_AGENT_METRICS_PORT`` is unset.

    The first call decides, and starts the HTTP endpoint when enabled.
    """
    global _instance, _decided  # noqa: PLW0603
    with _lock:
        if _decided:
            return _instance
        _decided = True
        raw = os.environ.get("AGENTMESH_AGENT_METRICS_PORT", "").strip()
        try:
            port = int(raw) if raw else 0
        except ValueError:
            log.warning("AGENTMESH_AGENT_METRICS_PORT=%r is not a port; handler metrics off", raw)
            port = 0
        if port <= 0:
            return None
        from prometheus_client import start_http_server  # noqa: PLC0415

        metrics = HandlerMetrics()
        host = os.environ.get("AGENTMESH_AGENT_METRICS_HOST", "127.0.0.1")
        try:
            start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            log.warning("cannot serve handler metrics on %s:%d: %s", host, port, exc)
        _instance = metrics
        return _instance
