"""Fixtures shared by the chaos suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos._harness import AgentProc, Server


@pytest.fixture
def procs() -> Iterator[list[AgentProc | Server]]:
    """Every process a test starts; all are killed at the end."""
    started: list[AgentProc | Server] = []
    yield started
    for p in started:
        p.stop()
