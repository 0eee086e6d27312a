"""RabbitMQ bus (aio-pika): one topic exchange per prefix.

The exchange ``f"{prefix}.bus"`` (durable topic) carries every message; the
routing key is the subject itself, so callers see the same subjects as with the
in-process bus, and buses with different prefixes never see each other.

Patterns translate to AMQP binding keys: ``*`` stays ``*`` and a trailing
``>`` (one or more tokens) becomes ``*.#`` (AMQP's ``#`` alone would also
match zero tokens). Headers travel as AMQP headers.

* A plain subscription owns an exclusive, auto-delete queue.
* A queue group is a shared queue ``f"{prefix}.group.{group}.{digest}"``
  (auto-delete; the digest stands for the pattern): RabbitMQ hands each
  message to one of its consumers. Unlike NATS, members of one group that
  subscribe with different patterns form different groups.
* A durable subscription is a durable queue ``f"{prefix}.durable.{name}"``
  consumed with manual acks; the channel's prefetch is ``max_pending``, so the
  broker never sends more than the subscription can buffer. Messages are
  published persistent, so a durable queue keeps them across a broker restart.
  With ``queue_type="quorum"`` (URL ``amqp://...?queue_type=quorum``) durable
  queues are quorum queues (``x-queue-type: quorum``): replicated by Raft over
  the RabbitMQ cluster's nodes, so a durable message survives the loss of a
  minority of them. Plain and group queues stay classic: they are exclusive or
  auto-delete, which quorum queues are not, and they hold nothing to keep.
  A queue keeps the type it was declared with: switching an existing
  deployment means deleting its durable queues (RabbitMQ refuses to redeclare
  a queue with another type: PRECONDITION_FAILED).

Plain and group subscriptions are consumed without acks; a subscriber that
falls behind ``max_pending`` loses messages, which are counted in ``dropped``.
``publish`` waits for the broker's publisher confirm. The connection is
aio-pika's robust connection: it reconnects by itself and restores channels,
queues, bindings and consumers.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from server.bus.memory import (
    Mailbox,
    QueueSubscription,
    check_durable_name,
    check_pattern,
    check_subject,
)
from server.domain.errors import UnavailableError
from server.ports import BusMessage

__all__ = ["RabbitMqBus", "binding_key"]

_log = logging.getLogger(__name__)


def binding_key(pattern: str) -> str:
    """The AMQP topic binding key for a bus pattern (``>`` -> ``*.#``)."""
    if pattern == ">":
        return "*.#"
    if pattern.endswith(".>"):
        return pattern[:-1] + "*.#"
    return pattern


QUEUE_TYPES = ("classic", "quorum")
"""Types of durable queues the bus declares (``x-queue-type``)."""


def split_queue_type(url: str) -> tuple[str, str | None]:
    """The URL without its ``queue_type`` query parameter, and that parameter's value."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    found = [v for k, v in query if k == "queue_type"]
    if not found:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "queue_type"])
    return urlunsplit(parts._replace(query=rest)), found[-1].strip().lower()


_QUEUE_NAME_PART = re.compile(r"[A-Za-z0-9_.:-]{1,100}")

_Consumer = Callable[[AbstractIncomingMessage], Awaitable[None]]


def _header_str(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _to_bus_message(message: AbstractIncomingMessage,
                    ack: Callable[[], Awaitable[None]] | None) -> BusMessage:
    headers = {k: _header_str(v) for k, v in message.headers.items()} if message.headers else {}
    stamp = message.timestamp.timestamp() if message.timestamp else time.time()
    return BusMessage(message.routing_key or "", message.body, headers, stamp, ack)


@dataclass(eq=False)
class _Sub:
    handle: QueueSubscription
    channel: AbstractChannel
    queue: AbstractQueue
    consumer_tag: str


class RabbitMqBus:
    """The ``Bus`` on RabbitMQ. Build it with ``await RabbitMqBus.connect(url)``."""

    def __init__(self, connection: AbstractRobustConnection, channel: AbstractChannel,
                 exchange: AbstractExchange, *, prefix: str,
                 operation_timeout: float = 10.0, queue_type: str = "classic") -> None:
        """Wrap an open connection (``connect`` is the usual way in)."""
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
        self._queue_type = queue_type
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._prefix = prefix
        self._timeout = operation_timeout
        self._subs: dict[QueueSubscription, _Sub] = {}
        self._closed = False

    @classmethod
    async def connect(cls, url: str = "amqp://guest:guest@127.0.0.1:5672/", *,
                      prefix: str = "agentmesh", operation_timeout: float = 10.0,
                      reconnect_interval: float = 5.0,
                      queue_type: str | None = None) -> RabbitMqBus:
        """Connect, declare the exchange ``f"{prefix}.bus"`` and return the bus.

        The connection reconnects every ``reconnect_interval`` seconds after a
        loss; every broker operation times out after ``operation_timeout``.
        ``queue_type`` (``classic`` or ``quorum``) of durable queues, else the
        URL's ``queue_type`` parameter (removed before connecting), else classic.
        """
        check_subject(prefix)
        url, from_url = split_queue_type(url)
        queue_type = queue_type or from_url or "classic"
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, got {queue_type!r}")
        try:
            connection = await aio_pika.connect_robust(
                url, timeout=operation_timeout, reconnect_interval=reconnect_interval,
                client_properties={"connection_name": f"agentmesh-bus-{prefix}"},
            )
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise UnavailableError(f"cannot connect to RabbitMQ: {exc}") from exc
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.declare_exchange(
                f"{prefix}.bus", aio_pika.ExchangeType.TOPIC, durable=True,
                timeout=operation_timeout,
            )
        except BaseException:
            await connection.close()
            raise
        return cls(connection, channel, exchange, prefix=prefix,
                   operation_timeout=operation_timeout, queue_type=queue_type)

    @property
    def exchange_name(self) -> str:
        """The topic exchange of this prefix."""
        return self._exchange.name

    def group_queue_name(self, group: str, pattern: str) -> str:
        """The shared queue of a queue group (a digest stands for the pattern)."""
        if not _QUEUE_NAME_PART.fullmatch(group):
            raise ValueError(f"invalid queue group {group!r}: use letters, digits and -_.:")
        digest = hashlib.sha256(pattern.encode()).hexdigest()[:16]
        return f"{self._prefix}.group.{group}.{digest}"

    @property
    def queue_type(self) -> str:
        """``classic`` or ``quorum``: the type of the durable queues this bus declares."""
        return self._queue_type

    def durable_queue_name(self, durable: str) -> str:
        """The queue that holds the messages of a durable subscription."""
        return f"{self._prefix}.durable.{durable}"

    async def __aenter__(self) -> RabbitMqBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
        """Send a message; returns once the broker confirmed it."""
        if self._closed:
            raise UnavailableError("the bus is closed")
        check_subject(subject)
        message = aio_pika.Message(
            data, headers=dict(headers) if headers else None, timestamp=time.time(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(message, routing_key=subject, mandatory=False,
                                         timeout=self._timeout)
        except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
            raise UnavailableError(f"rabbitmq publish failed: {exc}") from exc

    async def subscribe(self, pattern: str, *, queue_group: str = "", durable: str = "",
                        max_pending: int = 10_000) -> QueueSubscription:
        """Start receiving; returns once the queue is bound and consumed."""
        if self._closed:
            raise UnavailableError("the bus is closed")
        check_pattern(pattern)
        if durable:
            check_durable_name(durable)
        mailbox = Mailbox(max_pending, name=pattern)
        handle = QueueSubscription(mailbox, self._unsubscribe)
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            if durable:
                await channel.set_qos(prefetch_count=max_pending, timeout=self._timeout)
                queue = await channel.declare_queue(
                    self.durable_queue_name(durable), durable=True, timeout=self._timeout,
                    arguments={"x-queue-type": self._queue_type})
            elif queue_group:
                queue = await channel.declare_queue(
                    self.group_queue_name(queue_group, pattern), auto_delete=True,
                    timeout=self._timeout)
            else:
                queue = await channel.declare_queue(
                    f"{self._prefix}.sub.{uuid.uuid4().hex}", exclusive=True,
                    auto_delete=True, timeout=self._timeout)
            await queue.bind(self._exchange, routing_key=binding_key(pattern),
                             timeout=self._timeout)
            if durable:
                tag = await queue.consume(self._durable_consumer(mailbox), no_ack=False,
                                          timeout=self._timeout)
            else:
                tag = await queue.consume(self._plain_consumer(mailbox), no_ack=True,
                                          timeout=self._timeout)
        except BaseException:
            await channel.close()
            raise
        self._subs[handle] = _Sub(handle, channel, queue, tag)
        return handle

    @staticmethod
    def _plain_consumer(mailbox: Mailbox) -> _Consumer:
        async def on_message(message: AbstractIncomingMessage) -> None:
            mailbox.put_nowait(_to_bus_message(message, None))

        return on_message

    @staticmethod
    def _durable_consumer(mailbox: Mailbox) -> _Consumer:
        async def on_message(message: AbstractIncomingMessage) -> None:
            async def ack() -> None:
                await message.ack()

            if not mailbox.put_nowait(_to_bus_message(message, ack)):
                # Cannot happen while prefetch <= max_pending; give it back anyway.
                await message.nack(requeue=True)

        return on_message

    async def _unsubscribe(self, handle: QueueSubscription) -> None:
        record = self._subs.pop(handle, None)
        if record is not None:
            await self._release(record)

    async def _release(self, record: _Sub) -> None:
        try:
            await record.queue.cancel(record.consumer_tag, timeout=self._timeout)
        except (aio_pika.exceptions.AMQPError, ConnectionError, TimeoutError) as exc:
            _log.debug("rabbitmq cancel: %s", exc)
        try:
            await record.channel.close()
        except (aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            _log.debug("rabbitmq channel close: %s", exc)

    async def drain(self) -> None:
        """Stop consuming, hand subscribers what they hold, then close. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        records = list(self._subs.values())
        for record in records:
            await self._release(record)
        for record in records:
            record.handle.end(graceful=True)
        await self._connection.close()

    async def aclose(self) -> None:
        """Close the connection at once; subscriptions end. Safe to repeat."""
        self._closed = True
        records = list(self._subs.values())
        self._subs.clear()
        for record in records:
            record.handle.end(graceful=False)
        if not self._connection.is_closed:
            await self._connection.close()

