"""BusService use cases: namespaced publish/subscribe for gRPC-only agents."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from server.domain.errors import ResourceExhaustedError
from server.ports import Bus, BusMessage
from server.services import events


class Messaging:
    """Publish and subscribe inside a namespace (subjects never leave it)."""

    def __init__(self, bus: Bus, *, max_pending: int = 1000) -> None:
        self._bus = bus
        self._max_pending = max_pending

    async def publish(self, namespace: str, subject: str, data: bytes,
                      headers: Mapping[str, str]) -> None:
        """Publish on a namespaced subject."""
        await self._bus.publish(events.user_subject(namespace, subject), data, headers)

    async def subscribe(self, namespace: str, pattern: str,
                        queue_group: str = "") -> AsyncIterator[BusMessage]:
        """Messages on matching subjects, with the namespace prefix stripped.

        A subscriber that falls behind by more than ``max_pending`` messages is
        cut off with ResourceExhaustedError rather than buffered without bound.
        """
        prefix = events.user_subject(namespace, "")
        sub = await self._bus.subscribe(events.user_subject(namespace, pattern),
                                        queue_group=queue_group, max_pending=self._max_pending)
        try:
            async for message in sub:
                if sub.dropped:
                    raise ResourceExhaustedError(
                        f"subscriber fell behind by more than {self._max_pending} messages "
                        "and was cut off", reason="SLOW_CONSUMER")
                yield BusMessage(message.subject[len(prefix):], message.data, message.headers,
                                 message.publish_time)
        finally:
            await sub.unsubscribe()
