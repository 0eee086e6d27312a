"""OpenTelemetry tracing for agents and clients, configured from ``OTEL_*`` env vars.

Tracing is **off** unless the environment asks for it, and off costs nothing:
no interceptor is installed and no span is created. It is on when
``OTEL_SDK_DISABLED`` is not ``true`` and either

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
  set (OTLP, gRPC by default, ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` for
  HTTP; needs ``opentelemetry-exporter-otlp-proto-grpc`` or ``-http``), or
- ``OTEL_TRACES_EXPORTER`` names an exporter other than ``none``: ``otlp``,
  ``console``, or ``agentmesh_jsonl`` (one JSON object per finished span,
  appended to the file named by ``AGENTMESH_TRACES_FILE``; for tests and
  quick local debugging).

The other standard variables apply as usual: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``,
``OTEL_PROPAGATORS``.

How one workflow becomes one trace: the client's gRPC span (``SubmitTask`` /
``SubmitWorkflow``) injects ``traceparent`` into the call metadata; the server
stores it in every task of the workflow; the agent receives it with the
assignment and runs the handler in a span whose parent it is
(`handler_span`). Server-side spans (queue wait, assignment, result) use the
same parent, so client, replicas and agents all report into one trace.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
import structlog

from agent_sdk._metrics import HandlerOutcome, handler_metrics

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

__all__ = [
    "JSONL_EXPORTER",
    "LONG_LIVED_METHODS",
    "client_interceptors",
    "configure_tracing",
    "extract_context",
    "handler_span",
    "ids_from_traceparent",
    "task_log_context",
    "tracer",
    "tracing_requested",
]

JSONL_EXPORTER: Final = "agentmesh_jsonl"
"""``OTEL_TRACES_EXPORTER`` value selecting the JSON-lines file exporter."""

LONG_LIVED_METHODS: Final = frozenset({
    "Heartbeat", "ProcessTasks", "WatchAgents", "WatchTasks", "WatchWorkflow", "Watch",
    "Subscribe",
})
"""Streaming RPCs that last a session: not traced (a span would span hours)."""

_lock = threading.Lock()
_provider: TracerProvider | None = None
_configured = False


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables in ``env`` (default: os.environ) turn tracing on."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class JsonLinesSpanExporter:
    """A `SpanExporter` appending one JSON object per span to a file.

    Each line holds ``name``, ``trace_id``, ``span_id``, ``parent_id`` (hex,
    empty for a root), ``kind``, ``start``/``end`` (ns since the epoch),
    ``status``, ``attributes`` and ``service``. Lines are written with one
    ``write`` call under a lock, so several processes may share a file.
    """

    def __init__(self, path: str) -> None:
        """Append to ``path`` (created if missing)."""
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        """Write the spans; returns `SpanExportResult.SUCCESS`."""
        from opentelemetry.sdk.trace.export import SpanExportResult  # noqa: PLC0415

        lines = []
        for span in spans:
            ctx = span.context
            parent = span.parent
            lines.append(json.dumps({
                "name": span.name,
                "trace_id": format(ctx.trace_id, "032x") if ctx else "",
                "span_id": format(ctx.span_id, "016x") if ctx else "",
                "parent_id": format(parent.span_id, "016x") if parent else "",
                "kind": span.kind.name,
                "start": span.start_time,
                "end": span.end_time,
                "status": span.status.status_code.name,
                "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
                "service": str(span.resource.attributes.get("service.name", "")),
            }, separators=(",", ":")))
        data = "".join(line + "\n" for line in lines)
        with self._lock, open(self._path, "a", encoding="utf-8") as f:
            f.write(data)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Writes are synchronous: always flushed."""
        return True


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _exporter(env: Mapping[str, str]) -> SpanExporter | None:
    name = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    name = name.split(",")[0].strip()
    if name == JSONL_EXPORTER:
        path = env.get("AGENTMESH_TRACES_FILE", "agentmesh-spans.jsonl")
        return JsonLinesSpanExporter(path)  # type: ignore[return-value]
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        return ConsoleSpanExporter()
    if name != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported; tracing stays off", name)
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                       env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).strip().lower()
    # Imported by name: the OTLP exporters are optional extras of the distribution.
    module = ("opentelemetry.exporter.otlp.proto.http.trace_exporter"
              if protocol.startswith("http") else
              "opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    try:
        exporter: SpanExporter = importlib.import_module(module).OTLPSpanExporter()
        return exporter
    except ImportError:
        log.warning("OTLP tracing was requested but opentelemetry-exporter-otlp-proto-%s "
                    "is not installed; tracing stays off", "http" if protocol.startswith(
                        "http") else "grpc")
        return None


def configure_tracing(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the global OpenTelemetry tracer provider once, if tracing is requested.

    Returns whether tracing is on. Safe to call repeatedly (and from both the
    SDK and the server in one process): the first call decides. An existing
    SDK tracer provider set by the application is kept and used as is.
    ``OTEL_SERVICE_NAME`` overrides ``service_name``.
    """
    global _provider, _configured  # noqa: PLW0603
    with _lock:
        if _configured:
            return _provider is not None
        _configured = True
        env = os.environ if env is None else env
        if not tracing_requested(env):
            return False
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _provider = current
            return True
        exporter = _exporter(env)
        if exporter is None:
            return False
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service_name)})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return True


def tracing_enabled() -> bool:
    """Whether `configure_tracing` turned tracing on in this process."""
    return _provider is not None


def shutdown_tracing() -> None:
    """Flush and stop the provider installed by `configure_tracing` (safe to repeat)."""
    provider = _provider
    if provider is not None:
        provider.force_flush()


@functools.cache
def tracer() -> Tracer:
    """The agentmesh tracer (a no-op tracer while tracing is off).

    Made once: the SDK builds a new Tracer on every ``get_tracer`` call, which
    cost more than the span itself. Caching is safe before the provider is
    installed too: the API then returns a proxy that follows the provider set
    later.
    """
    from opentelemetry import trace  # noqa: PLC0415

    return trace.get_tracer("agentmesh")


def _method_of(details: object) -> str:
    method = getattr(details, "method", "")
    if isinstance(method, bytes):
        method = method.decode()
    return str(method).rsplit("/", 1)[-1]


def traced_call(details: object) -> bool:
    """Interceptor filter: trace every RPC except the session-long streams."""
    return _method_of(details) not in LONG_LIVED_METHODS


def client_interceptors(service_name: str = "agentmesh-client"
                        ) -> tuple[grpc.aio.ClientInterceptor, ...]:
    """The tracing client interceptors, or ``()`` when tracing is off.

    The unary interceptor of opentelemetry-instrumentation-grpc: one CLIENT
    span per call, ``traceparent`` injected into the call metadata. Streams
    are left alone (they last a session).
    """
    if not configure_tracing(service_name):
        return ()
    from opentelemetry.instrumentation import grpc as otel_grpc  # noqa: PLC0415

    made: list[object] = otel_grpc.aio_client_interceptors(  # type: ignore[no-untyped-call]
        filter_=traced_call)
    return tuple(i for i in made
                 if isinstance(i, grpc.aio.UnaryUnaryClientInterceptor))


def extract_context(carrier: Mapping[str, str]) -> Any:
    """An OpenTelemetry `Context` from a W3C carrier (``traceparent``...)."""
    from opentelemetry import propagate  # noqa: PLC0415

    return propagate.extract(dict(carrier))


def ids_from_traceparent(traceparent: str) -> tuple[str, str]:
    """``(trace_id, span_id)`` of a W3C ``traceparent``; empty strings if malformed."""
    parts = traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
        return parts[1], parts[2]
    return "", ""


@contextlib.contextmanager
def task_log_context(task_id: str, workflow: str, agent_id: str,
                     trace_context: Mapping[str, str]) -> Iterator[None]:
    """Bind task_id, workflow_id, agent_id and trace_id into log records (contextvars).

    Used around the creation of a handler's asyncio task: the task copies the
    context, so every record the handler logs carries the ids.
    """
    kv: dict[str, str] = {"task_id": task_id, "agent_id": agent_id}
    if workflow:
        kv["workflow_id"] = workflow.removeprefix("workflows/")
    trace_id, _ = ids_from_traceparent(trace_context.get("traceparent", ""))
    if trace_id:
        kv["trace_id"] = trace_id
    with structlog.contextvars.bound_contextvars(**kv):
        yield


def sampled(trace_context: Mapping[str, str]) -> bool:
    """Whether a W3C context is sampled (``traceparent`` flags bit 0); a cheap check
    that lets unsampled tasks skip span work entirely (parent-based sampling)."""
    parent = trace_context.get("traceparent", "")
    return len(parent) == 55 and parent[-1] in "13579bdf"


@contextlib.contextmanager
def handler_span(capability: str, task_id: str, *, workflow: str, attempt: int,
                 agent_id: str, trace_context: Mapping[str, str]) -> Iterator[Span | None]:
    """Observe one handler run: a span (child of the task's trace context) and metrics.

    Yields None and does nothing when tracing and handler metrics
    (``agent_sdk._metrics``) are both off. While the span is current,
    ``trace_id``/``span_id`` are bound into log records; an exception leaving
    the block marks the span as an error and propagates.
    """
    metrics = handler_metrics()
    if _provider is None and metrics is None:
        yield None
        return
    began = time.perf_counter()
    outcome: HandlerOutcome = "succeeded"
    try:
        if _provider is None or not sampled(trace_context):
            yield None
        else:
            attrs: dict[str, str | int] = {"agentmesh.task_id": task_id,
                                           "agentmesh.capability": capability,
                                           "agentmesh.attempt": attempt,
                                           "agentmesh.agent_id": agent_id}
            if workflow:
                attrs["agentmesh.workflow_id"] = workflow.removeprefix("workflows/")
            with _span(f"handle {capability}", attrs, trace_context) as span:
                yield span
    except Exception:
        outcome = "failed"
        raise
    except BaseException:
        outcome = "cancelled"
        raise
    finally:
        if metrics is not None:
            metrics.observe(capability, outcome, time.perf_counter() - began)


@contextlib.contextmanager
def _span(name: str, attrs: Mapping[str, str | int],
          trace_context: Mapping[str, str]) -> Iterator[Span]:
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    with tracer().start_as_current_span(
            name, context=extract_context(trace_context),
            kind=SpanKind.CONSUMER, attributes=attrs) as span:
        ctx = span.get_span_context()
        with structlog.contextvars.bound_contextvars(
                trace_id=format(ctx.trace_id, "032x"), span_id=format(ctx.span_id, "016x")):
            try:
                yield span
            except Exception as exc:
                span.set_attribute("error.type", getattr(exc, "error_type", "")
                                   or type(exc).__name__)
                raise
            except BaseException:  # cancellation: not an error of the task
                span.set_attribute("agentmesh.cancelled", True)
                raise
            else:
                span.set_status(trace.StatusCode.OK)
