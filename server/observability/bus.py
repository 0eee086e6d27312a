"""A `Bus` wrapper that counts messages and carries the trace context in headers.

`MeteredBus` counts ``agentmesh_bus_messages_published_total{kind}`` on
publish and ``agentmesh_bus_messages_delivered_total{kind}`` as subscribers
receive messages. ``kind`` is a small fixed set derived from the subject:
the system subject family (``task``, ``workflow``, ``ready``, ``cancel``,
``breaker``, ``agent``, ``state``), ``system`` for any other ``_sys.`` one,
or ``user`` for BusService subjects (``<namespace>.<subject>``); never the
subject itself.

With tracing on, a publish made inside a span that carries no
``traceparent`` header gets the current W3C context injected, so bus
messages travel with their trace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from server.observability.metrics import MeshMetrics
from server.ports import Bus, BusMessage, Subscription

__all__ = ["MeteredBus", "subject_kind"]

_SYSTEM_KINDS: Final = frozenset({"task", "workflow", "ready", "cancel", "breaker", "agent",
                                  "state"})


def subject_kind(subject: str) -> str:
    """The bounded ``kind`` label of a subject."""
    if subject.startswith("_sys."):
        family = subject[5:].split(".", 1)[0]
        return family if family in _SYSTEM_KINDS else "system"
    return "user"


class _MeteredSubscription:
    """Counts each message handed to the subscriber."""

    def __init__(self, inner: Subscription, count: Any) -> None:
        self._inner = inner
        self._count = count

    @property
    def dropped(self) -> int:
        """See Subscription.dropped."""
        return self._inner.dropped

    async def __aiter__(self) -> AsyncIterator[BusMessage]:
        count = self._count
        async for message in self._inner:
            count(message.subject)
            yield message

    def take_ready(self, limit: int) -> list[BusMessage]:
        """See Subscription.take_ready."""
        messages = self._inner.take_ready(limit)
        for message in messages:
            self._count(message.subject)
        return messages

    async def unsubscribe(self) -> None:
        """See Subscription.unsubscribe."""
        await self._inner.unsubscribe()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class MeteredBus:
    """Wraps a `Bus`: same behaviour, plus counters (and trace headers when tracing)."""

    def __init__(self, inner: Bus, metrics: MeshMetrics, *, inject_trace: bool = False) -> None:
        """Count into ``metrics``; ``inject_trace`` adds ``traceparent`` headers."""
        self._inner = inner
        self._metrics = metrics
        self._inject = inject_trace
        self._kinds: dict[str, str] = {}

    @property
    def inner(self) -> Bus:
        """The wrapped bus."""
        return self._inner

    def _kind(self, subject: str) -> str:
        kind = self._kinds.get(subject)
        if kind is None:
            kind = subject_kind(subject)
            if len(self._kinds) < 10_000:
                self._kinds[subject] = kind
        return kind

    def _delivered(self, subject: str) -> None:
        self._metrics.bus_delivered(self._kind(subject))

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
        """See Bus.publish."""
        # Internal notifications (``_sys.``) are published outside any span and
        # only wake replicas up; user messages carry the caller's trace context.
        if self._inject and not subject.startswith("_sys.") and (
                headers is None or "traceparent" not in headers):
            carrier: dict[str, str] = {}
            from opentelemetry import propagate  # noqa: PLC0415

            propagate.inject(carrier)
            if carrier:
                headers = {**(headers or {}), **carrier}
        await self._inner.publish(subject, data, headers)
        self._metrics.bus_published(self._kind(subject))

    async def subscribe(self, pattern: str, *, queue_group: str = "", durable: str = "",
                        max_pending: int = 10_000) -> Subscription:
        """See Bus.subscribe."""
        sub = await self._inner.subscribe(pattern, queue_group=queue_group, durable=durable,
                                          max_pending=max_pending)
        return _MeteredSubscription(sub, self._delivered)

    async def drain(self) -> None:
        """See Bus.drain."""
        await self._inner.drain()

    async def aclose(self) -> None:
        """See Bus.aclose."""
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
