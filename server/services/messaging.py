"""BusService use cases: namespaced publish/subscribe for gRPC-only agents."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

from server.domain.errors import ResourceExhaustedError
from server.ports import Bus, BusMessage, Subscription
from server.services import events


class DurableReceiver:
    """One stream of a durable consumer: deliveries numbered, acked by number.

    Ending it (``close``) unsubscribes; the bus then gives back whatever was
    delivered here and not acked (every ``Bus`` does, see its conformance
    suite), so another stream of the consumer, or the next one, gets it.
    """

    def __init__(self, sub: Subscription, strip: int) -> None:
        self._sub = sub
        self._strip = strip
        self._ids = itertools.count(1)
        self._acks: dict[int, Callable[[], Awaitable[None]]] = {}

    async def deliveries(self) -> AsyncIterator[tuple[int, BusMessage]]:
        """(delivery id, message with the namespace stripped) until closed."""
        async for message in self._sub:
            delivery = next(self._ids)
            if message.ack is not None:
                self._acks[delivery] = message.ack
            yield delivery, BusMessage(message.subject[self._strip:], message.data,
                                       message.headers, message.publish_time)

    async def ack(self, delivery_ids: Iterable[int]) -> int:
        """Acknowledge deliveries; unknown and repeated ids are ignored. Returns how many."""
        done = 0
        for delivery in delivery_ids:
            ack = self._acks.pop(delivery, None)
            if ack is not None:
                await ack()
                done += 1
        return done

    async def close(self) -> None:
        """Unsubscribe (what was not acked goes back to the consumer). Safe to repeat."""
        await self._sub.unsubscribe()


class Messaging:
    """Publish and subscribe inside a namespace (subjects never leave it)."""

    def __init__(self, bus: Bus, *, max_pending: int = 1000) -> None:
        self._bus = bus
        self._max_pending = max_pending

    async def publish(self, namespace: str, subject: str, data: bytes,
                      headers: Mapping[str, str]) -> None:
        """Publish on a namespaced subject."""
        await self._bus.publish(events.user_subject(namespace, subject), data, headers)

    async def subscribe_durable(self, namespace: str, pattern: str, name: str,
                                max_in_flight: int) -> DurableReceiver:
        """A stream of the durable consumer ``name`` of ``namespace``.

        The bus-level consumer is ``<namespace>__<name>``: namespaces have no
        ``_``, so two namespaces never share a consumer.
        """
        sub = await self._bus.subscribe(events.user_subject(namespace, pattern),
                                        durable=f"{namespace}__{name}",
                                        max_pending=max_in_flight)
        return DurableReceiver(sub, len(events.user_subject(namespace, "")))

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
