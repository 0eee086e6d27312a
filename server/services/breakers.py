"""Circuit breakers per (agent, capability), shared between replicas.

Each breaker is a ``pybreaker.CircuitBreaker``: ``fail_max`` consecutive
failures (retryable failure reports and lease expiries of that agent for that
capability) open it; after ``reset_timeout`` seconds it may be half-opened by
the dispatcher, which lets ONE probe task through; the probe's success closes
it, its failure opens it again.

Sharing between replicas (the choice, and why): every replica runs the same
breaker state machines on the same stream of *outcome events*. Whoever
observes an outcome (the replica that accepted a result or failure, or the
replica whose reaper expired a lease -- ``fail`` is fenced, so exactly one
does) applies it locally and publishes ``{"agent", "cap", "ok"}`` on
``_sys.breaker.<namespace>``; the other replicas apply it on receipt. So
replica B sees agent X's breaker open as soon as the event arrives, without a
Redis round trip on the dispatch path. pybreaker's own Redis storage was not
used: it takes a synchronous redis client, which would block the event loop.
Probes are local: an agent's work stream lives on one replica, which is the
only one that can dispatch to it. A replica that starts late begins with
closed breakers (state is soft: at worst one extra failure per agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import pybreaker

from server.aio import cancel_and_wait
from server.ports import Bus, Subscription
from server.services import events
from server.services.clock import Clock, SystemClock

log = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Thresholds (from settings)."""

    fail_max: int = 5
    reset_timeout: float = 10.0


class _Failure(Exception):
    """Stands for a failed call when feeding an outcome to pybreaker."""


def _fail() -> None:
    raise _Failure


def _ok() -> None:
    return None


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, board: BreakerBoard, key: tuple[str, str]) -> None:
        self._board = board
        self._key = key

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object,
                     new_state: object) -> None:
        self._board._changed(self._key, str(getattr(new_state, "name", new_state)))


class BreakerBoard:
    """The breakers this replica knows, fed by local and remote outcomes."""

    def __init__(self, bus: Bus, config: BreakerConfig | None = None, *,
                 on_change: Callable[[str, str, str], None] | None = None,
                 replica: str = "", clock: Clock | None = None) -> None:
        self._bus = bus
        self.config = config or BreakerConfig()
        self._on_change = on_change
        self._replica = replica
        self._clock: Clock = clock or SystemClock()
        self._breakers: dict[tuple[str, str], pybreaker.CircuitBreaker] = {}
        self._opened_at: dict[tuple[str, str], float] = {}
        self._probes: dict[tuple[str, str], str] = {}
        self._runner: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()
        """Set on every state change (the dispatcher re-polls); cleared by readers."""

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Listen to other replicas' outcome events."""
        sub = await self._bus.subscribe(events.BREAKER_ALL, max_pending=10_000)
        self._runner = asyncio.create_task(self._listen(sub), name="breaker-listener")

    async def stop(self) -> None:
        """Stop listening. Safe to repeat."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await cancel_and_wait(runner)

    async def _listen(self, sub: Subscription) -> None:
        try:
            async for message in sub:
                if self._replica and message.headers.get(events.ORIGIN_HEADER) == self._replica:
                    continue
                body = events.decode(message.data)
                agent, cap = str(body.get("agent", "")), str(body.get("cap", ""))
                if agent and cap:
                    self._apply(agent, cap, bool(body.get("ok", False)))
        finally:
            await sub.unsubscribe()

    # -- queries -------------------------------------------------------------------

    def state(self, agent: str, capability: str) -> str:
        """closed, open or half-open (an open breaker past its reset timeout reads half-open)."""
        cb = self._breakers.get((agent, capability))
        if cb is None:
            return CLOSED
        state = str(cb.current_state)
        if state == OPEN and self._elapsed((agent, capability)):
            return HALF_OPEN
        return state

    def allows(self, agent: str, capability: str) -> bool:
        """May the dispatcher give this agent a task of this capability now?"""
        key = (agent, capability)
        state = self.state(agent, capability)
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            return key not in self._probes
        return False

    def blocked(self, agent: str, capability: str) -> bool:
        """True while open and not yet due for a probe (the agent is unusable for it)."""
        cb = self._breakers.get((agent, capability))
        return (cb is not None and str(cb.current_state) == OPEN
                and not self._elapsed((agent, capability)))

    def open_keys(self) -> list[tuple[str, str]]:
        """(agent, capability) pairs whose breaker is not closed."""
        return [k for k, cb in self._breakers.items() if str(cb.current_state) != CLOSED]

    def any_open(self) -> bool:
        """True when some breaker is not closed (the dispatcher polls on ticks then)."""
        return any(str(cb.current_state) != CLOSED for cb in self._breakers.values())

    # -- updates -------------------------------------------------------------------

    def dispatched(self, agent: str, capability: str, task_id: str) -> None:
        """A task was leased to the agent; past the reset timeout it is the probe."""
        key = (agent, capability)
        cb = self._breakers.get(key)
        if cb is None or str(cb.current_state) == CLOSED:
            return
        if str(cb.current_state) == OPEN:
            cb.half_open()
        self._probes[key] = task_id

    async def record(self, namespace: str, agent: str, capability: str, ok: bool) -> None:
        """An outcome of ``agent`` for ``capability``: apply it and tell the other replicas.

        A success where this replica holds no breaker is not broadcast: every
        replica creates a breaker only on a failure, and every failure is
        broadcast, so no replica has anything for that success to reset (the
        common case: one message per finished task saved on every replica).
        """
        if not agent or not capability:
            return
        if ok and (agent, capability) not in self._breakers:
            return
        self._apply(agent, capability, ok)
        try:
            await self._bus.publish(
                events.breaker_subject(namespace),
                events.encode({"agent": agent, "cap": capability, "ok": ok}),
                {events.ORIGIN_HEADER: self._replica} if self._replica else None)
        except Exception:
            log.warning("could not publish a breaker outcome", exc_info=True)

    def forget(self, agent: str) -> None:
        """Drop the breakers of an agent that went away."""
        for key in [k for k in self._breakers if k[0] == agent]:
            del self._breakers[key]
            self._opened_at.pop(key, None)
            self._probes.pop(key, None)

    def _apply(self, agent: str, capability: str, ok: bool) -> None:
        key = (agent, capability)
        cb = self._breakers.get(key)
        if cb is None:
            if ok:
                return  # a closed breaker with no failures: nothing to record
            cb = pybreaker.CircuitBreaker(
                fail_max=self.config.fail_max, reset_timeout=self.config.reset_timeout,
                listeners=[_Listener(self, key)], name=f"{agent}/{capability}")
            self._breakers[key] = cb
        self._probes.pop(key, None)
        with contextlib.suppress(_Failure, pybreaker.CircuitBreakerError):
            cb.call(_ok if ok else _fail)
        if ok and str(cb.current_state) == CLOSED and cb.fail_counter == 0:
            # Closed and clean: no need to keep it.
            self._breakers.pop(key, None)
            self._opened_at.pop(key, None)

    def _elapsed(self, key: tuple[str, str]) -> bool:
        opened = self._opened_at.get(key)
        return opened is None or self._clock.now() - opened >= self.config.reset_timeout

    def _changed(self, key: tuple[str, str], state: str) -> None:
        if state == OPEN:
            self._opened_at[key] = self._clock.now()
        elif state == CLOSED:
            self._opened_at.pop(key, None)
        log.info("breaker %s/%s -> %s", key[0], key[1], state)
        self.changed.set()
        if self._on_change is not None:
            try:
                self._on_change(key[0], key[1], state)
            except Exception:
                log.warning("breaker observer failed", exc_info=True)


__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerBoard", "BreakerConfig"]
