"""Dispatch scope: what one ``TaskStore.lease_next`` call may take.

The scheduler builds a :class:`LeaseScope` per agent and dispatch round; the
store applies it inside its one atomic step, so the limits hold across
replicas sharing a store:

- fallback: tasks of a primary capability that no usable agent serves, whose
  ``fallback_capability`` is one the agent offers;
- per-capability and per-key concurrency limits, checked against RUNNING
  counters the store keeps next to the tasks;
- per-capability rate limits, a token bucket kept in the store.

Pure values, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

KEY_SCAN = 32
"""How deep a queue is scanned past tasks blocked by a per-key limit."""


@dataclass(frozen=True, slots=True)
class DispatchLimits:
    """Fairness and protection limits (from settings). Empty maps mean no limit."""

    capability_limits: Mapping[str, int] = field(default_factory=dict)
    """Most RUNNING tasks per capability (per namespace)."""
    key_label: str = ""
    """Label whose value is the fairness key (e.g. "tenant"); empty disables key limits."""
    key_limits: Mapping[str, int] = field(default_factory=dict)
    """Most RUNNING tasks per key value; ``default_key_limit`` for values not listed."""
    default_key_limit: int = 0
    """Limit of key values not in ``key_limits``; 0 means none."""
    capability_rates: Mapping[str, float] = field(default_factory=dict)
    """Leases per second per capability (token bucket, burst ``max(1, rate)``)."""

    @property
    def active(self) -> bool:
        """True when any limit is set (the dispatcher then re-polls on every tick)."""
        return bool(self.capability_limits or self.capability_rates or (
            self.key_label and (self.key_limits or self.default_key_limit)))

    def key_limit(self, value: str) -> int:
        """The limit of one key value (0: none)."""
        return self.key_limits.get(value, self.default_key_limit)

    def to_doc(self) -> dict[str, object]:
        """JSON-ready form (the Redis script reads it)."""
        return {"cap": dict(self.capability_limits), "label": self.key_label,
                "keys": dict(self.key_limits), "key_default": self.default_key_limit,
                "rates": {k: repr(float(v)) for k, v in self.capability_rates.items()}}


NO_LIMITS = DispatchLimits()


@dataclass(frozen=True, slots=True)
class LeaseScope:
    """Fallback reach of one lease call.

    ``fallback_for`` are the agent's capabilities that may serve as a fallback;
    a task of primary capability P with ``fallback_capability`` F in that set
    may be taken when P is not in ``available`` (no live agent offers it, or
    every such agent's breaker for P is open).
    """

    fallback_for: tuple[str, ...] = ()
    available: frozenset[str] = frozenset()


NO_FALLBACK = LeaseScope()


def bucket_take(tokens: float, stamp: float, rate: float, now: float) -> tuple[float, float, bool]:
    """Refill a token bucket to ``now`` and try to take one token.

    Returns the new (tokens, stamp) and whether a token was available. A fresh
    bucket (``stamp == 0``) starts full. Burst is ``max(1, rate)``.
    """
    burst = max(1.0, rate)
    tokens = burst if stamp <= 0 else min(burst, tokens + max(0.0, now - stamp) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, now, True
    return tokens, now, False


def bucket_has(tokens: float, stamp: float, rate: float, now: float) -> bool:
    """Whether :func:`bucket_take` would succeed, without taking."""
    return bucket_take(tokens, stamp, rate, now)[2]
