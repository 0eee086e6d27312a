"""Shared helpers for tests that need real services or free ports.

Services on the development machine: Redis 127.0.0.1:6379, NATS 127.0.0.1:4222,
RabbitMQ 127.0.0.1:5672 (override with AGENTMESH_TEST_REDIS_URL,
AGENTMESH_TEST_NATS_URL, AGENTMESH_TEST_AMQP_URL). A test that needs a missing
service is skipped with the reason, except under CI=true, where it fails.
Tests isolate themselves with :func:`unique_prefix`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any, NoReturn
from urllib.parse import urlparse

import pytest

from server.backends.redis import RedisStores

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("AGENTMESH_TEST_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("AGENTMESH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unique_prefix(kind: str = "t") -> str:
    """A per-run prefix for keys, subjects and queue names."""
    return f"amtest-{kind}-{uuid.uuid4().hex[:10]}"


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def skip_or_fail(message: str) -> NoReturn:
    """Skip a test that lacks a service or tool; under CI=true, fail it instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(message + " -- under CI=true a missing service is a failure")
    pytest.skip(message)


def require_service(name: str, url: str, default_port: int) -> None:
    """Skip (or fail under CI=true) when the service does not answer."""
    if not _reachable(url, default_port):
        skip_or_fail(f"{name} is not reachable at {url}; start it: `.ci/run` starts "
                     "Redis, NATS and RabbitMQ (or see docs/dependencies.md, 'System')")


def require_redis() -> str:
    """The shared Redis URL, or skip/fail."""
    require_service("Redis", REDIS_URL, 6379)
    return REDIS_URL


def require_nats() -> str:
    """The shared NATS URL, or skip/fail."""
    require_service("NATS", NATS_URL, 4222)
    return NATS_URL


def require_amqp() -> str:
    """The shared RabbitMQ URL, or skip/fail."""
    require_service("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


@contextlib.asynccontextmanager
async def redis_stores(kind: str, url: str | None = None,
                       **options: Any) -> AsyncIterator[RedisStores]:
    """Redis stores under a fresh prefix on ``url`` (default: the shared Redis); their
    keys are deleted after. ``options`` go to ``RedisStores.connect``."""
    stores = await RedisStores.connect(url or require_redis(), prefix=unique_prefix(kind),
                                       **options)
    try:
        yield stores
    finally:
        await stores.delete_all_keys()
        await stores.aclose()
