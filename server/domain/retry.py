"""Retry decisions: whether a failed attempt is retried, and after what delay.

The delays come from tenacity's wait strategies (exponential, with full jitter
by default); the scheduler puts the task on a timer index and never sleeps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import tenacity
from tenacity.wait import wait_base

from server.domain.models import Jitter, RetryPolicy, Task, TaskFailure

DELIVERY_FAILED = "DELIVERY_FAILED"
"""An attempt the server could not deliver to its agent: the server's fault."""
MAX_UNCHARGED = 3
"""Undelivered attempts forgiven per retry budget; past these they count, so a
task that can never be delivered still ends (dead-lettered) instead of looping."""


class RetryVerdict(enum.Enum):
    """What becomes of a failed attempt."""

    RETRY = "retry"
    FAIL = "fail"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """The verdict and, for RETRY, the delay in seconds."""

    verdict: RetryVerdict
    delay: float = 0.0


def wait_strategy(policy: RetryPolicy) -> wait_base:
    """The tenacity wait strategy for a policy."""
    if policy.jitter is Jitter.NONE:
        return tenacity.wait_exponential(
            multiplier=policy.initial_backoff, max=policy.max_backoff, exp_base=policy.multiplier)
    return tenacity.wait_random_exponential(
        multiplier=policy.initial_backoff, max=policy.max_backoff, exp_base=policy.multiplier)


def backoff_delay(policy: RetryPolicy, attempt: int) -> float:
    """Delay before attempt ``attempt + 1`` after attempt ``attempt`` failed (attempt >= 1)."""
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(wait_strategy(policy)(state))


def decide(policy: RetryPolicy, attempt: int, failure: TaskFailure,
           budget_start: int = 0) -> RetryDecision:
    """Decide the fate of attempt number ``attempt`` that failed with ``failure``.

    ``budget_start`` is the attempt number at the last human re-drive, which
    gives the task a fresh budget of ``max_attempts``.

    Non-retryable failures (flagged by the agent or listed in the policy) end the
    task as FAILED; exhausted attempts dead-letter it so a human can re-drive it.
    """
    if failure.non_retryable or failure.error_type in policy.non_retryable_error_types:
        return RetryDecision(RetryVerdict.FAIL)
    if failure.error_type == DELIVERY_FAILED and attempt - budget_start < policy.max_attempts:
        return RetryDecision(RetryVerdict.RETRY, 0.0)
    if attempt - budget_start >= policy.max_attempts:
        return RetryDecision(RetryVerdict.DEAD_LETTER)
    return RetryDecision(RetryVerdict.RETRY, backoff_delay(policy, attempt - budget_start))


def uncharged_attempts(task: Task) -> int:
    """Attempts since the last re-drive that the server failed to deliver (forgiven).

    ``decide`` is given ``task.attempt - uncharged_attempts(task)``, so an
    agent loss caused by the server's own send never costs the task an
    attempt (up to ``MAX_UNCHARGED`` per budget).
    """
    forgiven = sum(1 for a in task.attempts
                   if a.attempt > task.budget_start and a.failure is not None
                   and a.failure.error_type == DELIVERY_FAILED)
    return min(forgiven, MAX_UNCHARGED)
