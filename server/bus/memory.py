"""In-process bus: the embedded default, and the shared building blocks of every bus.

``InProcessBus`` routes messages inside one process. Besides it this module
holds what the broker adapters (``server/bus/nats.py``, ``server/bus/rabbitmq.py``)
share, so the three buses behave the same to a caller:

* subject and pattern rules (``check_subject``, ``check_pattern``,
  ``pattern_matches``): dot-separated tokens, ``*`` matches one token and ``>``
  one or more trailing tokens, as in NATS;
* ``Mailbox``: the bounded per-subscription buffer. Delivery never blocks the
  publisher: a message that finds the buffer full is dropped and counted, the
  way nats-core treats a slow consumer, and the first drop is logged once;
* ``QueueSubscription``: the ``Subscription`` a caller iterates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from server.domain.errors import UnavailableError
from server.ports import BusMessage

__all__ = [
    "InProcessBus",
    "Mailbox",
    "QueueSubscription",
    "check_durable_name",
    "check_pattern",
    "check_subject",
    "pattern_matches",
]

_log = logging.getLogger(__name__)

_ROUTE_CACHE_LIMIT = 4096
_FORBIDDEN_CHARS = frozenset(" \t\r\n")


# --------------------------------------------------------------------------- subjects


@functools.lru_cache(maxsize=4096)
def _subject_ok(subject: str) -> bool:
    if not subject or _FORBIDDEN_CHARS.intersection(subject):
        return False
    return all(tok and tok not in ("*", ">") for tok in subject.split("."))


@functools.lru_cache(maxsize=1024)
def _pattern_ok(pattern: str) -> bool:
    if not pattern or _FORBIDDEN_CHARS.intersection(pattern):
        return False
    tokens = pattern.split(".")
    for i, tok in enumerate(tokens):
        if not tok:
            return False
        if tok == ">" and i != len(tokens) - 1:
            return False
        if tok not in ("*", ">") and ("*" in tok or ">" in tok):
            return False
    return True


def check_subject(subject: str) -> None:
    """Raise ValueError unless ``subject`` can be published to.

    A subject is one or more non-empty dot-separated tokens without whitespace
    and without the wildcards ``*`` and ``>``.
    """
    if not _subject_ok(subject):
        raise ValueError(f"invalid bus subject {subject!r}")


def check_pattern(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a valid subscription pattern.

    Like a subject, except that a token may be ``*`` (exactly one token) and the
    last token may be ``>`` (one or more tokens).
    """
    if not _pattern_ok(pattern):
        raise ValueError(f"invalid bus subject pattern {pattern!r}")


def check_durable_name(name: str) -> None:
    """Raise ValueError unless ``name`` is usable as a durable consumer name.

    Letters, digits, ``-`` and ``_`` only, so the name is valid on every broker
    (JetStream consumer names may not contain dots or wildcards).
    """
    if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        raise ValueError(f"invalid durable name {name!r}: use letters, digits, '-' and '_'")


def pattern_matches(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    """Whether the tokens of ``subject`` match the tokens of ``pattern``."""
    for i, ptok in enumerate(pattern):
        if ptok == ">":
            return len(subject) > i
        if i >= len(subject):
            return False
        if ptok != "*" and ptok != subject[i]:
            return False
    return len(subject) == len(pattern)


# --------------------------------------------------------------------------- mailbox


class Mailbox:
    """A bounded FIFO of messages for one subscription (or one durable consumer).

    ``put_nowait`` never blocks: when ``max_pending`` messages wait already, the
    new one is dropped and counted in ``dropped`` (the first drop is logged as a
    warning). Several readers may wait on one mailbox; each message goes to one.
    """

    __slots__ = ("_dropped", "_items", "_max", "_name", "_space", "_waiters")

    def __init__(self, max_pending: int, *, name: str = "") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._items: deque[BusMessage] = deque()
        self._max = max_pending
        self._name = name
        self._dropped = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._space: asyncio.Event | None = None

    @property
    def dropped(self) -> int:
        """Messages dropped because the mailbox was full."""
        return self._dropped

    @property
    def max_pending(self) -> int:
        """The capacity."""
        return self._max

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, msg: BusMessage) -> bool:
        """Append ``msg``; False (and one more drop counted) when full."""
        if len(self._items) >= self._max:
            self.record_drop()
            return False
        self._items.append(msg)
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        return True

    def requeue(self, msgs: list[BusMessage]) -> None:
        """Put messages back at the head, in order (redelivery; never dropped)."""
        self._items.extendleft(reversed(msgs))
        if msgs:
            self.wake_all()

    def record_drop(self, count: int = 1) -> None:
        """Count messages lost before they reached the mailbox (or at it)."""
        if self._dropped == 0:
            _log.warning("slow consumer on %s: dropping messages (max_pending=%d)",
                         self._name or "subscription", self._max)
        self._dropped += count

    def get_nowait(self) -> BusMessage | None:
        """The oldest message, or None when empty."""
        if not self._items:
            return None
        msg = self._items.popleft()
        if self._space is not None:
            self._space.set()
        return msg

    async def wait(self) -> None:
        """Wait until a message arrives or ``wake_all`` is called."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Woken and cancelled at once: pass the wake-up on to another reader.
            if waiter.done() and not waiter.cancelled() and self._items:
                self.wake_all()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def wake_all(self) -> None:
        """Wake every waiting reader (used when a subscription ends)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_space(self) -> int:
        """Wait until the mailbox has room; return the number of free slots."""
        while len(self._items) >= self._max:
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            await self._space.wait()
        return self._max - len(self._items)

    def clear(self) -> None:
        """Forget every buffered message."""
        self._items.clear()
        if self._space is not None:
            self._space.set()


# --------------------------------------------------------------------------- subscription


class QueueSubscription:
    """A ``Subscription`` reading one ``Mailbox``.

    Iteration yields messages until the subscription ends: at once after
    ``unsubscribe()`` or the bus's ``aclose()``, and once the buffered messages
    are consumed after the bus's ``drain()``.
    """

    def __init__(
        self,
        mailbox: Mailbox,
        on_unsubscribe: Callable[[QueueSubscription], Awaitable[None]] | None = None,
    ) -> None:
        self._mailbox = mailbox
        self._on_unsubscribe = on_unsubscribe
        self._closed = False
        self._ending = False

    @property
    def dropped(self) -> int:
        """Messages dropped because the subscriber did not keep up."""
        return self._mailbox.dropped

    @property
    def mailbox(self) -> Mailbox:
        """The buffer this subscription reads."""
        return self._mailbox

    @property
    def closed(self) -> bool:
        """True once the subscription has ended (or is ending after a drain)."""
        return self._closed or self._ending

    def __aiter__(self) -> QueueSubscription:
        """Messages in publish order (per publisher)."""
        return self

    async def __anext__(self) -> BusMessage:
        """The next message; StopAsyncIteration once the subscription ended."""
        mailbox = self._mailbox
        while True:
            if self._closed:
                raise StopAsyncIteration
            msg = mailbox.get_nowait()
            if msg is not None:
                return msg
            if self._ending:
                raise StopAsyncIteration
            await mailbox.wait()

    def take_ready(self, limit: int) -> list[BusMessage]:
        """See Subscription.take_ready."""
        out: list[BusMessage] = []
        if self._closed:
            return out
        get = self._mailbox.get_nowait
        while len(out) < limit:
            msg = get()
            if msg is None:
                break
            out.append(msg)
        return out

    async def unsubscribe(self) -> None:
        """Stop receiving; iteration ends. Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        self._mailbox.wake_all()
        if self._on_unsubscribe is not None:
            callback, self._on_unsubscribe = self._on_unsubscribe, None
            await callback(self)

    def end(self, *, graceful: bool) -> None:
        """End iteration without telling the bus (the bus is closing).

        ``graceful``: the buffered messages are still yielded first.
        """
        self._on_unsubscribe = None
        if graceful:
            self._ending = True
        else:
            self._closed = True
        self._mailbox.wake_all()


# --------------------------------------------------------------------------- in-process bus


@dataclass(eq=False, slots=True)
class _Member:
    """One routing target: a subscription's (or durable consumer's) mailbox."""

    tokens: tuple[str, ...]
    mailbox: Mailbox
    group: str = ""
    durable: str = ""


@dataclass(slots=True)
class _Route:
    """The precomputed targets of one subject."""

    plain: tuple[Mailbox, ...] = ()
    durable: tuple[_Durable, ...] = ()
    groups: tuple[tuple[str, tuple[Mailbox, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.plain or self.durable or self.groups)


@dataclass(eq=False, slots=True)
class _Durable:
    """A durable consumer: its mailbox, and what it delivered that was not acked.

    ``unacked`` maps ``id(message)`` to the message (the entry keeps the
    message alive, so the id stays its own); ``taker`` says which
    subscription took it, so that subscription's departure redelivers it.
    """

    member: _Member
    pattern: str
    unacked: dict[int, BusMessage] = field(default_factory=dict)
    taker: dict[int, QueueSubscription] = field(default_factory=dict)

    def put(self, subject: str, data: bytes, headers: dict[str, str], when: float) -> None:
        """Buffer a message whose ``ack`` forgets it."""
        unacked, taker = self.unacked, self.taker

        async def ack() -> None:
            key = id(msg)
            if unacked.get(key) is msg:
                del unacked[key]
                taker.pop(key, None)

        mailbox = self.member.mailbox
        if len(unacked) >= mailbox.max_pending:
            # Buffered plus delivered-and-unacked is bounded too (JetStream's
            # max_ack_pending): a consumer that never acks cannot grow memory.
            mailbox.record_drop()
            return
        msg = BusMessage(subject, data, headers, when, ack)
        if mailbox.put_nowait(msg):
            unacked[id(msg)] = msg

    def taken(self, sub: QueueSubscription, msg: BusMessage) -> None:
        """``sub`` received ``msg``."""
        if self.unacked.get(id(msg)) is msg:
            self.taker[id(msg)] = sub

    def release(self, sub: QueueSubscription) -> None:
        """``sub`` left: what it took and did not ack goes back, oldest first."""
        back = [m for k, m in self.unacked.items() if self.taker.get(k) is sub]
        for m in back:
            del self.taker[id(m)]
        self.member.mailbox.requeue(back)


class _DurableSubscription(QueueSubscription):
    """A subscription to a durable consumer: records who took each message."""

    def __init__(self, state: _Durable,
                 on_unsubscribe: Callable[[QueueSubscription], Awaitable[None]]) -> None:
        super().__init__(state.member.mailbox, on_unsubscribe)
        self._state = state

    async def __anext__(self) -> BusMessage:
        """See QueueSubscription; the message is now this subscription's to ack."""
        msg = await super().__anext__()
        self._state.taken(self, msg)
        return msg

    def take_ready(self, limit: int) -> list[BusMessage]:
        """See Subscription.take_ready."""
        out = super().take_ready(limit)
        for msg in out:
            self._state.taken(self, msg)
        return out


class InProcessBus:
    """The ``Bus`` inside one process: no broker, no persistence.

    Publishing never blocks: each matching subscription gets the message through
    ``Mailbox.put_nowait`` and a full mailbox drops and counts it. Publishing
    with no subscriber costs a subject check and one attribute test. Routes per
    subject are cached until the set of subscriptions changes.

    Queue groups: among the matching members of a group (same group name), one
    receives each message, in round-robin order.

    Durable subscriptions: a durable consumer lives as long as this bus; while
    no subscription is attached it keeps buffering matching messages (bounded
    by the ``max_pending`` of its first subscription, drops counted), and a new
    subscription with the same name resumes from there. Several attached
    subscriptions share the consumer (each message goes to one). Delivery is
    at least once within the process: a message taken and not acked goes back
    to the head of the consumer's queue when the subscription that took it
    unsubscribes. Messages buffered plus delivered-and-unacked are bounded by
    ``max_pending`` (past it, new ones are dropped and counted). Nothing
    survives the process.
    """

    def __init__(self) -> None:
        self._members: list[_Member] = []
        self._routes: dict[str, _Route] = {}
        self._durables: dict[str, _Durable] = {}
        self._handles: set[QueueSubscription] = set()
        self._round_robin: dict[str, int] = {}
        self._closed = False

    async def __aenter__(self) -> InProcessBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def publish(self, subject: str, data: bytes,
                      headers: Mapping[str, str] | None = None) -> None:
        """Deliver to every matching subscription; returns at once."""
        if self._closed:
            raise UnavailableError("the bus is closed")
        if not _subject_ok(subject):
            raise ValueError(f"invalid bus subject {subject!r}")
        if not self._members:
            return
        route = self._routes.get(subject)
        if route is None:
            route = self._route(subject)
        if not route:
            return
        hdrs = dict(headers) if headers else {}
        msg = BusMessage(subject, data, hdrs, time.time())
        for mailbox in route.plain:
            mailbox.put_nowait(msg)
        for group, members in route.groups:
            turn = self._round_robin.get(group, 0)
            self._round_robin[group] = turn + 1
            members[turn % len(members)].put_nowait(msg)
        for state in route.durable:
            state.put(subject, data, hdrs, msg.publish_time)

    def _route(self, subject: str) -> _Route:
        tokens = tuple(subject.split("."))
        plain: list[Mailbox] = []
        durable: list[_Durable] = []
        groups: dict[str, list[Mailbox]] = {}
        for member in self._members:
            if not pattern_matches(member.tokens, tokens):
                continue
            if member.durable:
                durable.append(self._durables[member.durable])
            elif member.group:
                groups.setdefault(member.group, []).append(member.mailbox)
            else:
                plain.append(member.mailbox)
        route = _Route(tuple(plain), tuple(durable),
                       tuple((g, tuple(m)) for g, m in groups.items()))
        if len(self._routes) >= _ROUTE_CACHE_LIMIT:
            self._routes.clear()
        self._routes[subject] = route
        return route

    async def subscribe(self, pattern: str, *, queue_group: str = "", durable: str = "",
                        max_pending: int = 10_000) -> QueueSubscription:
        """Start receiving matching messages published from now on.

        With ``durable``, resume the named in-process consumer (``queue_group``
        is then ignored: the durable name itself is the group). ValueError for
        a bad pattern or a durable name reused with another pattern.
        """
        if self._closed:
            raise UnavailableError("the bus is closed")
        check_pattern(pattern)
        if durable:
            return self._subscribe_durable(pattern, durable, max_pending)
        mailbox = Mailbox(max_pending, name=pattern)
        member = _Member(tuple(pattern.split(".")), mailbox, group=queue_group)

        async def remove(sub: QueueSubscription) -> None:
            self._handles.discard(sub)
            self._remove_member(member)

        sub = QueueSubscription(mailbox, remove)
        self._add_member(member)
        self._handles.add(sub)
        return sub

    def _subscribe_durable(self, pattern: str, name: str, max_pending: int) -> QueueSubscription:
        check_durable_name(name)
        state = self._durables.get(name)
        if state is None:
            member = _Member(tuple(pattern.split(".")), Mailbox(max_pending, name=name),
                             durable=name)
            state = _Durable(member, pattern)
            self._durables[name] = state
            self._add_member(member)
        elif state.pattern != pattern:
            raise ValueError(
                f"durable {name!r} exists with pattern {state.pattern!r}, not {pattern!r}")

        async def detach(sub: QueueSubscription) -> None:
            self._handles.discard(sub)
            if self._durables.get(name) is state:
                state.release(sub)

        sub = _DurableSubscription(state, detach)
        self._handles.add(sub)
        return sub

    def _add_member(self, member: _Member) -> None:
        self._members.append(member)
        self._routes.clear()

    def _remove_member(self, member: _Member) -> None:
        try:
            self._members.remove(member)
        except ValueError:
            return
        self._routes.clear()

    async def drain(self) -> None:
        """Stop accepting messages; subscribers still get what is buffered. Safe to repeat."""
        self._shutdown(graceful=True)

    async def aclose(self) -> None:
        """Close at once: every subscription ends now. Safe to repeat."""
        self._shutdown(graceful=False)

    def _shutdown(self, *, graceful: bool) -> None:
        self._closed = True
        for sub in list(self._handles):
            sub.end(graceful=graceful)
        if not graceful:
            self._handles.clear()
            for member in self._members:
                member.mailbox.clear()
        self._members.clear()
        self._routes.clear()
        self._durables.clear()
