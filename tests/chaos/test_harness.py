"""The chaos harness itself: a server that fails to start leaves no process behind.

Callers put a server on their clean-up list only once ``Server.start`` returns,
so every way start-up can fail must kill and reap the child it spawned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.chaos._harness import ROOT, Server

pytestmark = pytest.mark.slow

SILENT = [sys.executable, "-c", "import time; time.sleep(600)"]
"""A process that never answers on its port."""


def _gone(pid: int) -> bool:
    """True once ``pid`` is reaped (not even a zombie is left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_start_timeout_kills_and_reaps_the_child() -> None:
    server = Server({}, argv=SILENT)
    server.startup_timeout = 0.5
    with pytest.raises(TimeoutError, match=r"did not answer within 0\.5 s"):
        await server.start()
    assert server.proc is not None
    assert server.proc.returncode is not None  # reaped
    assert _gone(server.proc.pid)


async def test_child_exiting_early_is_reported_at_once_and_reaped() -> None:
    server = Server({}, argv=[sys.executable, "-c", "raise SystemExit(3)"])
    server.startup_timeout = 60.0
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 3 before answering"):
        await server.start()
    assert time.monotonic() - started < 30  # not the whole start-up timeout
    assert server.proc is not None
    assert _gone(server.proc.pid)


async def test_cancelled_start_kills_and_reaps_the_child() -> None:
    server = Server({}, argv=SILENT)
    task = asyncio.create_task(server.start())
    await asyncio.sleep(0.3)  # spawned (synchronously), now waiting on the port
    assert server.proc is not None
    assert server.proc.poll() is None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.proc.returncode is not None
    assert _gone(server.proc.pid)


async def test_nemesis_server_start_up_failure_is_reaped_too(tmp_path: Path) -> None:
    from loadtests.nemesis import NemesisServer, tied  # noqa: PLC0415

    server = NemesisServer({}, ROOT, log=tmp_path / "server.log")
    assert server.startup_timeout == 90.0
    server.argv = tied(*SILENT)  # through the campaign's launcher, as its servers are
    server.startup_timeout = 0.5
    with pytest.raises(TimeoutError):
        await server.start()
    assert server.proc is not None
    assert _gone(server.proc.pid)


async def test_servers_start_while_the_embedded_fixed_ports_are_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another agentmesh here (say `make loadtest`'s mesh) holds the console (8470)
    and A2A (41241) ports of embedded mode: harness servers still start, also
    outside pytest (chaos_bench, acceptance), whose conftest turns A2A off."""
    monkeypatch.delenv("AGENTMESH_A2A_PORT", raising=False)
    monkeypatch.delenv("AGENTMESH_CONSOLE_PORT", raising=False)
    with contextlib.ExitStack() as stack:
        for port in (8470, 41241):
            sock = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # already held by something: as good
                sock.bind(("127.0.0.1", port))
                sock.listen()
        server = await Server({}).start()
        try:
            assert server.proc is not None and server.proc.poll() is None
        finally:
            server.stop()
