"""Jittered exponential backoff shared by the client and the agent."""

from __future__ import annotations

import random

import grpc

#: Codes a call is retried on when it is safe to repeat it.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
#: Codes an idempotent call is also retried on.
IDEMPOTENT_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.DEADLINE_EXCEEDED})


def backoff_delay(attempt: int, *, base: float = 0.05, cap: float = 5.0) -> float:
    """Jittered delay before retry number ``attempt`` (from 0).

    With ``d = min(cap, base * 2**attempt)`` the delay is uniform in ``[d/2, d]``,
    so retries spread out but never spin with a zero delay.
    """
    delay = min(cap, base * (2.0 ** min(attempt, 30)))
    return random.uniform(delay / 2.0, delay)
