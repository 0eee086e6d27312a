"""Shared fixtures: an embedded control plane on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from server.app import Mesh, running_server
from server.settings import Settings


def embedded_settings(**overrides: object) -> Settings:
    """Settings of a test server: free port, no metrics port, fast timers."""
    values: dict[str, object] = {"port": 0, "metrics_port": 0, "heartbeat_interval": 0.2,
                                 "tick": 0.02, "drain_grace": 0.5}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """A running embedded mesh."""
    async with running_server(embedded_settings()) as running:
        yield running


@pytest.fixture
async def channel(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the mesh."""
    async with grpc.aio.insecure_channel(mesh.address) as ch:
        yield ch
