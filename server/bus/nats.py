"""NATS bus (nats-py): core NATS for fan-out and queue groups, JetStream for durables.

Wire subjects are ``f"{subject_prefix}.{subject}"``; the prefix is stripped on
delivery, so callers see the same subjects as with the in-process bus, and two
meshes (or two test runs) with different prefixes never see each other.

Durable subscriptions use JetStream. The first durable subscription creates
(if missing) one stream per prefix, named ``stream_name``, capturing
``f"{subject_prefix}.>"`` with a short retention (``stream_max_age``,
``stream_max_bytes``): once it exists, every message under the prefix is
stored, so keep durable use to low-volume subjects. On a NATS cluster the
stream is replicated (``stream_replicas``; by default 3 when the server
reports a cluster of 3 or more, else 1), so a durable message survives the
loss of a node; an existing stream keeps the replicas it was created with. Each durable name is a
JetStream durable pull consumer (explicit ack, starting with the messages
published after its creation); several subscriptions with the same durable name
share its messages. Unacknowledged messages come back after ``ack_wait``.

Reconnection: nats-py reconnects by itself. By default this bus retries forever
(``max_reconnect_attempts=-1``) every ``reconnect_time_wait`` seconds;
subscriptions are restored by the client, and publishes made while
disconnected are buffered (up to nats-py's 2 MiB pending buffer, after which
``publish`` raises UnavailableError). Pings every ``ping_interval`` seconds
detect a dead server after ``max_outstanding_pings`` missed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from server.aio import cancel_and_wait, raise_if_cancelling
from server.bus.memory import (
    Mailbox,
    QueueSubscription,
    check_durable_name,
    check_pattern,
    check_subject,
)
from server.domain.errors import UnavailableError
from server.ports import BusMessage

__all__ = ["NatsBus"]

_log = logging.getLogger(__name__)

_FETCH_TIMEOUT = 1.0
"""Life of one pull request, and so the longest a durable unsubscribe waits."""
_FETCH_RETRY_DELAY = 0.5


def stream_name_for(subject_prefix: str) -> str:
    """The JetStream stream name used for durables under ``subject_prefix``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", subject_prefix) + "-bus"


@dataclass(eq=False)
class _Sub:
    """Bookkeeping of one subscription: its NATS side and its owned task."""

    handle: QueueSubscription
    core: NatsSubscription | None = None
    pull: JetStreamContext.PullSubscription | None = None
    task: asyncio.Task[None] | None = None
    unacked: dict[int, Msg] = field(default_factory=dict)
    """Durable messages this subscription fetched and has not acked yet."""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set: the pull loop is to end after the fetch in progress (see ``_release``)."""
    fetching: bool = False


class NatsBus:
    """The ``Bus`` on NATS. Build it with ``await NatsBus.connect(url)``."""

    def __init__(self, nc: Client, *, subject_prefix: str = "agentmesh",
                 stream_max_age: float = 3600.0, stream_max_bytes: int = 256 * 1024 * 1024,
                 ack_wait: float = 30.0, stream_replicas: int = 0) -> None:
        """Wrap a connected nats-py client (``connect`` is the usual way in)."""
        check_subject(subject_prefix)
        self._nc = nc
        self._js = nc.jetstream()
        self._prefix = subject_prefix
        self._wire_prefix = subject_prefix + "."
        self._strip = len(self._wire_prefix)
        self._stream = stream_name_for(subject_prefix)
        self._stream_max_age = stream_max_age
        self._stream_max_bytes = stream_max_bytes
        self._ack_wait = ack_wait
        self._stream_replicas = stream_replicas or _cluster_replicas(nc)
        self._stream_ready = False
        self._stream_lock = asyncio.Lock()
        self._subs: dict[QueueSubscription, _Sub] = {}
        self._by_core: dict[NatsSubscription, Mailbox] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        subject_prefix: str = "agentmesh",
        name: str | None = None,
        connect_timeout: float = 2.0,
        reconnect_time_wait: float = 2.0,
        max_reconnect_attempts: int = -1,
        ping_interval: float = 20.0,
        max_outstanding_pings: int = 3,
        drain_timeout: float = 10.0,
        initial_connect_timeout: float = 10.0,
        stream_max_age: float = 3600.0,
        stream_max_bytes: int = 256 * 1024 * 1024,
        ack_wait: float = 30.0,
        stream_replicas: int = 0,
    ) -> NatsBus:
        """Connect to NATS and return the bus.

        ``url``: one server URL or several (a cluster). ``max_reconnect_attempts``
        of -1 means retry forever, every ``reconnect_time_wait`` seconds, once
        connected; the first connection must succeed within
        ``initial_connect_timeout`` seconds or UnavailableError is raised.
        ``stream_max_age``/``stream_max_bytes`` bound the JetStream stream that
        durables use; ``ack_wait`` is how long an unacknowledged durable message
        waits before it is delivered again. ``stream_replicas``: JetStream
        replicas of that stream (0: 3 on a cluster of 3 or more servers, else 1).
        """
        holder: list[NatsBus] = []

        async def error_cb(exc: Exception) -> None:
            if holder and isinstance(exc, nats.errors.SlowConsumerError):
                holder[0]._on_slow_consumer(exc)
                return
            _log.warning("nats error: %s", exc)

        async def disconnected_cb() -> None:
            if holder and holder[0]._closed:
                _log.debug("nats: disconnected on close")
            else:
                _log.warning("nats: disconnected; reconnecting")

        async def reconnected_cb() -> None:
            _log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url
                      else "?")
            if holder:
                holder[0]._restart_pulls()

        async def closed_cb() -> None:
            _log.info("nats: connection closed")

        options: dict[str, Any] = {
            "servers": [url] if isinstance(url, str) else list(url),
            "name": name,
            "connect_timeout": connect_timeout,
            "reconnect_time_wait": reconnect_time_wait,
            "max_reconnect_attempts": max_reconnect_attempts,
            "ping_interval": ping_interval,
            "max_outstanding_pings": max_outstanding_pings,
            "drain_timeout": drain_timeout,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
        }
        nc = Client()
        try:
            async with asyncio.timeout(initial_connect_timeout):
                await nc.connect(**options)
        except TimeoutError as exc:
            await nc.close()
            raise UnavailableError(f"cannot connect to NATS at {url}") from exc
        bus = cls(nc, subject_prefix=subject_prefix, stream_max_age=stream_max_age,
                  stream_max_bytes=stream_max_bytes, ack_wait=ack_wait,
                  stream_replicas=stream_replicas)
        holder.append(bus)
        return bus

    @property
    def subject_prefix(self) -> str:
        """The prefix of every wire subject."""
        return self._prefix

    @property
    def stream_name(self) -> str:
        """The JetStream stream that holds durable messages of this prefix."""
        return self._stream

    @property
    def stream_replicas(self) -> int:
        """JetStream replicas of the stream this bus creates."""
        return self._stream_replicas

    @property
    def is_connected(self) -> bool:
        """True while the client has a live connection."""
        return bool(self._nc.is_connected)

    async def __aenter__(self) -> NatsBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
        """Send a message (buffered by the client while reconnecting)."""
        if self._closed:
            raise UnavailableError("the bus is closed")
        check_subject(subject)
        try:
            await self._nc.publish(self._wire_prefix + subject, data,
                                   headers=dict(headers) if headers else None)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
                nats.errors.OutboundBufferLimitError) as exc:
            raise UnavailableError(f"nats publish failed: {exc}") from exc
        # nats-py's Client._flush_pending (reached by every publish) catches
        # CancelledError and returns: re-raise a cancellation it swallowed.
        raise_if_cancelling()

    async def flush(self) -> None:
        """Round-trip to the server: everything published before has reached it."""
        try:
            await self._nc.flush()
        except (nats.errors.ConnectionClosedError, nats.errors.TimeoutError) as exc:
            raise UnavailableError(f"nats flush failed: {exc}") from exc
        raise_if_cancelling()

    async def subscribe(self, pattern: str, *, queue_group: str = "", durable: str = "",
                        max_pending: int = 10_000) -> QueueSubscription:
        """Start receiving; returns once the server knows the interest.

        Core subscriptions (with or without ``queue_group``) drop and count
        messages past ``max_pending``. A ``durable`` subscription fetches only
        as many messages as its buffer has room for, so it never drops
        (``queue_group`` is ignored: the durable name is the group).
        """
        if self._closed:
            raise UnavailableError("the bus is closed")
        check_pattern(pattern)
        mailbox = Mailbox(max_pending, name=pattern)
        handle = QueueSubscription(mailbox, self._unsubscribe)
        record = _Sub(handle)
        wire = self._wire_prefix + pattern
        if durable:
            check_durable_name(durable)
            await self._ensure_stream()
            await self._ensure_consumer(durable, wire, max_pending)
            record.pull = await self._js.pull_subscribe_bind(durable=durable, stream=self._stream)
            self._subs[handle] = record
            self._start_pull(record)
            return handle

        strip = self._strip

        async def on_msg(msg: Msg) -> None:
            mailbox.put_nowait(BusMessage(msg.subject[strip:], msg.data, msg.headers or {},
                                          time.time()))

        try:
            record.core = await self._nc.subscribe(wire, queue=queue_group, cb=on_msg,
                                                   pending_msgs_limit=max_pending)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as exc:
            raise UnavailableError(f"nats subscribe failed: {exc}") from exc
        self._by_core[record.core] = mailbox
        self._subs[handle] = record
        try:
            await self._nc.flush()
        except nats.errors.Error as exc:
            # Disconnected: the client sends the interest again once it reconnects.
            _log.warning("nats subscribe to %s not confirmed yet: %s", pattern, exc)
        return handle

    def _start_pull(self, record: _Sub) -> None:
        assert record.pull is not None
        record.task = asyncio.create_task(self._pull_loop(record), name="nats-durable-pull")
        record.task.add_done_callback(_log_task_failure)

    def _restart_pulls(self) -> None:
        """After a reconnect, re-issue pull requests the old server will never answer."""
        if self._closed:
            return
        for record in self._subs.values():
            if record.task is not None:
                old = record.task
                old.cancel()
                self._retired.add(old)
                old.add_done_callback(self._retired.discard)
                self._start_pull(record)

    def _on_slow_consumer(self, exc: nats.errors.SlowConsumerError) -> None:
        mailbox = self._by_core.get(exc.sub)
        if mailbox is not None:
            mailbox.record_drop()

    async def _ensure_stream(self) -> None:
        async with self._stream_lock:
            if self._stream_ready:
                return
            try:
                await self._js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                config = StreamConfig(
                    name=self._stream, subjects=[self._wire_prefix + ">"],
                    max_age=self._stream_max_age, max_bytes=self._stream_max_bytes,
                    storage=StorageType.FILE, num_replicas=self._stream_replicas,
                    description=f"agentmesh durable bus messages under {self._prefix}",
                )
                try:
                    await self._js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    # Another replica may have created it meanwhile; if not, this raises.
                    await self._js.stream_info(self._stream)
                _log.info("created JetStream stream %s", self._stream)
            self._stream_ready = True

    async def _ensure_consumer(self, durable: str, wire: str, max_pending: int) -> None:
        try:
            info = await self._js.consumer_info(self._stream, durable)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=durable, name=durable, filter_subject=wire,
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
                ack_wait=self._ack_wait, max_ack_pending=max_pending,
            )
            await self._js.add_consumer(self._stream, config)
            return
        if info.config.filter_subject != wire:
            raise ValueError(
                f"durable {durable!r} exists for {info.config.filter_subject!r}, not {wire!r}")

    async def _pull_loop(self, record: _Sub) -> None:
        """Fetch durable messages one by one while the mailbox has room (owned task)."""
        strip = self._strip
        pull, mailbox, unacked = record.pull, record.handle.mailbox, record.unacked
        assert pull is not None
        while not record.stopping.is_set():
            # nats-py's fetch turns a cancellation into its own TimeoutError:
            # without this check, a cancelled loop would go on for ever.
            raise_if_cancelling()
            await mailbox.wait_for_space()
            if record.stopping.is_set():
                return
            record.fetching = True
            try:
                msgs = await pull.fetch(1, timeout=_FETCH_TIMEOUT)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                return
            except nats.errors.Error as exc:
                _log.warning("nats durable fetch failed (%s); retrying", exc)
                await asyncio.sleep(_FETCH_RETRY_DELAY)
                continue
            finally:
                record.fetching = False
            for msg in msgs:
                unacked[id(msg)] = msg
                mailbox.put_nowait(BusMessage(
                    msg.subject[strip:], msg.data, msg.headers or {},
                    _js_time(msg), _acker(msg, unacked),
                ))

    async def _unsubscribe(self, handle: QueueSubscription) -> None:
        record = self._subs.pop(handle, None)
        if record is None:
            return
        # Shielded: unsubscribing is often the cleanup of a cancelled task (a
        # stream whose client left), where stopping the pull task would raise
        # the caller's cancellation half way and skip the naks below.
        await asyncio.shield(self._release(record))

    async def _release(self, record: _Sub) -> None:
        if record.task is not None and record.pull is not None and record.fetching:
            # Let the fetch in progress end by itself (within its expiry) rather
            # than cancel it: a cancelled fetch leaves its pull request on a
            # nats-server older than 2.10, which would deliver the next message
            # to an inbox nobody reads, where it would wait for ack_wait.
            record.stopping.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(record.task), _FETCH_TIMEOUT + 1.0)
        if record.task is not None:
            await _stop(record.task)
        try:
            if record.core is not None:
                self._by_core.pop(record.core, None)
                await record.core.unsubscribe()
            if record.pull is not None:
                await record.pull.unsubscribe()
        except nats.errors.Error as exc:
            _log.debug("nats unsubscribe: %s", exc)
        # What this subscriber fetched and never acked goes back to the consumer
        # now, rather than after ack_wait: the next subscriber gets it at once.
        pending, record.unacked = list(record.unacked.values()), {}
        for msg in pending:
            try:
                await msg.nak()
            except nats.errors.Error as exc:  # redelivered after ack_wait anyway
                _log.debug("nats nak: %s", exc)

    async def drain(self) -> None:
        """Flush publishes, hand subscribers what is in flight, then close. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        records = list(self._subs.values())
        # Durable pulls have no reader inside nats-py: release them first so the
        # client's drain does not wait for their internal queues.
        for record in records:
            if record.pull is not None:
                await self._release(record)
        try:
            await self._nc.drain()
        except nats.errors.Error as exc:
            _log.warning("nats drain failed (%s); closing", exc)
            await self._nc.close()
        for record in records:
            record.handle.end(graceful=True)

    async def aclose(self) -> None:
        """Close the connection at once; subscriptions end. Safe to repeat."""
        self._closed = True
        records = list(self._subs.values())
        self._subs.clear()
        self._by_core.clear()
        for record in records:
            record.handle.end(graceful=False)
        tasks = [r.task for r in records if r.task is not None] + list(self._retired)
        for task in tasks:
            await _stop(task)
        await self._nc.close()


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel an owned task and wait for it; its failure was logged already."""
    with contextlib.suppress(Exception):
        await cancel_and_wait(task)


def _acker(msg: Msg, unacked: dict[int, Msg]) -> Callable[[], Awaitable[None]]:
    """``BusMessage.ack`` of a durable message: ack it, and stop tracking it."""

    async def ack() -> None:
        await msg.ack()
        if unacked.get(id(msg)) is msg:
            del unacked[id(msg)]

    return ack


def _cluster_replicas(nc: Client) -> int:
    """3 when the server reports a cluster of 3 or more servers (INFO ``connect_urls``
    lists every server's client address), else 1."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    if info.get("cluster") and len(info.get("connect_urls") or []) >= 3:
        return 3
    return 1


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("nats durable pull stopped", exc_info=task.exception())


def _js_time(msg: Msg) -> float:
    try:
        return msg.metadata.timestamp.timestamp()
    except (nats.errors.Error, ValueError, IndexError):
        return time.time()
