"""asyncio helpers every room may use: loops and shutdowns that survive a swallowed cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait", "raise_if_cancelling"]


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` when the current task was asked to stop but went on.

    Some awaited calls swallow a cancellation: nats-py's publish flush catches
    ``CancelledError``, and Python 3.11's ``asyncio.wait_for`` (used inside
    client libraries) drops one that lands as the awaited call finishes. The
    request then stays visible only as ``Task.cancelling()``. A periodic loop
    that did not look would run on for ever and the shutdown (a TaskGroup, or
    ``await task`` after ``cancel()``) would hang. Call this at the top of
    every pass, outside any ``asyncio.timeout`` block.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended.

    Its own ``CancelledError`` is expected and not raised; a cancellation of
    the *caller* while it waits (a shutdown deadline) is, unlike with
    ``contextlib.suppress(CancelledError)``, which would swallow both.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        raise_if_cancelling()
