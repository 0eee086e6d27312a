"""gRPC server interceptors: request metrics and log context (always on), tracing (opt-in).

`ObservabilityInterceptor` wraps every RPC of the server, unary and
streaming, and records ``agentmesh_grpc_requests_total{method, code}`` and
``agentmesh_grpc_request_duration_seconds{method}`` (a stream's duration is
its lifetime). ``method`` is the full method name of a *registered* handler:
calls to unknown methods are not recorded, so a client cannot grow the label
set. ``code`` is the final status code name.

While a handler runs, ``rpc_method`` is bound into log records (structlog
contextvars). grpc.aio runs every RPC in its own asyncio task, so the binding
is made without a reset: it dies with the task.

The tracing interceptor comes from opentelemetry-instrumentation-grpc
(`server/observability/tracing.py`) and is only installed when tracing is on.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import structlog

from server.observability.metrics import MeshMetrics

__all__ = ["ObservabilityInterceptor"]

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _code_name(context: grpc.aio.ServicerContext[Any, Any], default: str) -> str:
    """The status code set on ``context`` (by abort or set_code), else ``default``."""
    try:
        code: object = context.code()
    except Exception:  # noqa: BLE001 - an old grpc without ServicerContext.code()
        return default
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return default


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC by method and status code; binds ``rpc_method`` in logs."""

    def __init__(self, metrics: MeshMetrics) -> None:
        """Record into ``metrics``."""
        self._metrics = metrics
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """Wrap the handler of a known method (cached per method)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED; not recorded
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        if len(self._wrapped) < 1000:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _record(self, method: str, code: str, began: float) -> None:
        self._metrics.grpc_request(method, code, time.perf_counter() - began)

    def _wrap(self, method: str, handler: _Handler) -> _Handler:
        short = method.rsplit("/", 1)[-1]
        record = self._record
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}

        async def call(behavior: Callable[..., Any], request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            began = time.perf_counter()
            code = "UNKNOWN"
            structlog.contextvars.bind_contextvars(rpc_method=short)
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = _code_name(context, "OK")
                return result
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                record(method, code, began)

        async def stream(behavior: Callable[..., AsyncIterator[Any]], request: Any,
                         context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            began = time.perf_counter()
            code = "UNKNOWN"
            structlog.contextvars.bind_contextvars(rpc_method=short)
            try:
                async for item in behavior(request, context):
                    yield item
                code = _code_name(context, "OK")
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except Exception:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                record(method, code, began)

        if handler.unary_unary is not None:
            uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                  ) -> Any:
                return await call(uu, request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
        if handler.stream_unary is not None:
            su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext[Any, Any]
                                   ) -> Any:
                return await call(su, requests, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        behavior: Any = handler.unary_stream or handler.stream_stream
        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[Any]:
                async for item in stream(behavior, request, context):
                    yield item

            return make(streaming, **kwargs)

        # A coroutine that writes with context.write (grpc_health's Watch).
        async def writing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await call(behavior, request, context)

        return make(writing, **kwargs)
