"""Fixtures shared by the conformance suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests._services import skip_or_fail
from tests.conformance.test_redis_restart import HAVE_REDIS_SERVER, PrivateRedis


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A private redis-server on a free port (the shared one is never restarted or
    flushed), stopped at the end whatever happens."""
    if not HAVE_REDIS_SERVER:
        skip_or_fail("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
