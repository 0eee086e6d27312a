"""Two servers never share a port: a port in use is an error at start-up naming it.

gRPC enables SO_REUSEPORT by default, so a second ``agentmesh serve --port P``
used to bind P next to the first one and take half its connections. Now the
second one fails before serving anything: ``running_server`` raises
``PortInUseError`` (gRPC port or metrics port alike) and ``agentmesh serve``
prints one line and exits with status 3.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import Mesh, running_server
from server.cli import EXIT_PORT_IN_USE, build_parser
from server.netutil import PortInUseError, ensure_free
from tests._services import free_port
from tests.conftest import embedded_settings

ROOT = Path(__file__).resolve().parent.parent
AGENTMESH = shutil.which("agentmesh", path=str(Path(sys.executable).parent)) or shutil.which(
    "agentmesh")


@pytest.fixture
async def first(tmp_path: Path) -> AsyncIterator[Mesh]:
    """A mesh on a fixed gRPC port and a fixed metrics port."""
    settings = embedded_settings(port=free_port(), metrics_port=free_port(),
                                 blob=str(tmp_path / "blob"))
    async with running_server(settings) as mesh:
        yield mesh


async def serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_second_server_on_the_grpc_port_is_refused(first: Mesh, tmp_path: Path) -> None:
    port = first.port
    with pytest.raises(PortInUseError) as err:
        async with running_server(embedded_settings(port=port, blob=str(tmp_path / "b2"))):
            pytest.fail("the second server started on a port in use")
    assert err.value.port == port and err.value.purpose == "gRPC"
    assert str(err.value) == (f"port {port} is already in use (gRPC on 127.0.0.1); "
                              "is another agentmesh running?")
    assert await serving(first.address)


async def test_a_second_server_on_the_metrics_port_is_refused(first: Mesh,
                                                              tmp_path: Path) -> None:
    metrics_port = first.settings.metrics_port
    grpc_port = free_port()
    with pytest.raises(PortInUseError) as err:
        async with running_server(embedded_settings(port=grpc_port, metrics_port=metrics_port,
                                                    blob=str(tmp_path / "b2"))):
            pytest.fail("the second server started on a metrics port in use")
    assert err.value.port == metrics_port and err.value.purpose == "metrics"
    assert f"port {metrics_port} is already in use (metrics" in str(err.value)
    assert await serving(first.address)
    # The refused server let its gRPC port go again.
    ensure_free("127.0.0.1", grpc_port, "gRPC")


async def test_port_zero_still_picks_a_free_port(tmp_path: Path) -> None:
    async with running_server(embedded_settings(blob=str(tmp_path / "a"))) as a, \
            running_server(embedded_settings(blob=str(tmp_path / "b"))) as b:
        assert a.port and b.port and a.port != b.port
        assert await serving(a.address) and await serving(b.address)


async def test_grpc_itself_no_longer_shares_the_port() -> None:
    """Without the probe, the grpc option alone refuses the second bind."""
    options = [("grpc.so_reuseport", 0)]
    one = grpc.aio.server(options=options)
    port = one.add_insecure_port("127.0.0.1:0")
    await one.start()
    two = grpc.aio.server(options=options)
    try:
        try:
            bound = two.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            bound = 0
        assert bound == 0
    finally:
        await two.stop(None)
        await one.stop(None)


def test_a_plain_listener_counts_too() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            ensure_free("127.0.0.1", port, "gRPC")
    ensure_free("127.0.0.1", 0, "gRPC")  # 0 is never in use


def test_the_exit_status_is_documented() -> None:
    text = build_parser().format_help()
    assert f"{EXIT_PORT_IN_USE} serve: a port" in " ".join(text.split())


# -- agentmesh serve, twice --------------------------------------------------------------


async def _serve(*args: str) -> asyncio.subprocess.Process:
    assert AGENTMESH is not None, "the agentmesh console script is not installed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for key in [k for k in env if k.startswith("AGENTMESH_")]:
        del env[key]
    return await asyncio.create_subprocess_exec(
        AGENTMESH, "serve", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _until_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(30):
        while True:
            assert proc.returncode is None, "the first server exited"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


@pytest.mark.parametrize("taken", ["gRPC", "metrics", "console"])
async def test_agentmesh_serve_twice_exits_with_one_line(taken: str, tmp_path: Path) -> None:
    grpc_port, metrics_port, console_port = free_port(), free_port(), free_port()
    first = await _serve("--port", str(grpc_port), "--metrics-port", str(metrics_port),
                         "--console-port", str(console_port), "--blob", str(tmp_path / "one"))
    try:
        await _until_listening(grpc_port, first)
        await _until_listening(metrics_port, first)
        await _until_listening(console_port, first)
        if taken == "gRPC":
            args = ["--port", str(grpc_port), "--metrics-port", "0", "--console-port", "0"]
            busy = grpc_port
        elif taken == "metrics":
            args = ["--port", "0", "--metrics-port", str(metrics_port), "--console-port", "0"]
            busy = metrics_port
        else:
            args = ["--port", "0", "--metrics-port", "0", "--console-port", str(console_port)]
            busy = console_port
        second = await _serve(*args, "--blob", str(tmp_path / "two"))
        async with asyncio.timeout(30):
            _, err_bytes = await second.communicate()
        err = err_bytes.decode()
        assert second.returncode == EXIT_PORT_IN_USE, err
        assert "Traceback" not in err
        assert err.splitlines() == [
            f"agentmesh: error: port {busy} is already in use ({taken} on 127.0.0.1); "
            "is another agentmesh running?"]
        assert first.returncode is None  # the first one is untouched
    finally:
        first.terminate()
        async with asyncio.timeout(30):
            await first.communicate()
