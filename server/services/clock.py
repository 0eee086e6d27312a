"""The clock the services read, injectable so tests drive time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds."""

    def now(self) -> float:
        """Current Unix time in seconds."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """Current Unix time in seconds."""
        return time.time()


class ManualClock:
    """A clock tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        """The set time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self._now += seconds
