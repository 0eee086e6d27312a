"""The SDK's lock context manager and the snapshot CLI, end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent_sdk import AbortedError, LockLostError, MeshClient
from server.app import Mesh, running_server
from server.cli import main_async
from tests.conftest import embedded_settings


async def test_lock_renews_fences_and_is_lost(mesh: Mesh) -> None:
    async with MeshClient(mesh.address) as a, MeshClient(mesh.address) as b:
        async with a.lock("job", lease=0.6, wait=0) as lock:
            await lock.put("job/state", {"step": 1})
            await asyncio.sleep(1.5)  # longer than the lease: renewal keeps it
            with pytest.raises(AbortedError) as held:
                await b.acquire_lock("job", lease=1, wait=0)
            assert held.value.reason == "LOCK_HELD"
            # Someone takes the lock away (here: released with the holder's token,
            # then acquired by b, as after an expiry).
            await b.release_lock("job", lock.fencing_token)
            token_b, _ = await b.acquire_lock("job", lease=5, wait=0)
            assert token_b > lock.fencing_token
            await asyncio.wait_for(lock.lost.wait(), 2)
            with pytest.raises(LockLostError):
                await lock.put("job/state", {"step": "zombie"})
            # A write that reaches the server with the old token is refused too.
            with pytest.raises(AbortedError):
                await a.put_state("job/state", {"step": "zombie"}, lock="job",
                                  fencing_token=lock.fencing_token)
            await b.put_state("job/state", {"step": 2}, lock="job", fencing_token=token_b)
        entry = await b.get_state("job/state")
        assert entry is not None and entry.value == {"step": 2}


async def test_snapshot_cli_round_trip(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    blob = str(tmp_path / "snaps")
    async with running_server(embedded_settings(blob=blob)) as first:
        async with MeshClient(first.address) as client:
            await client.put_state("config/a", {"x": 1})
            await client.submit_task("later", {"n": 1})
        assert await main_async(["--server", first.address, "snapshot", "create"]) == 0
        assert await main_async(["--server", first.address, "--json", "snapshot",
                                 "list"]) == 0
    out = capsys.readouterr().out
    name = out.split("created ", 1)[1].split(" ", 1)[0]
    assert name in out.split("created", 1)[1]
    async with running_server(embedded_settings(blob=blob)) as second:
        assert await main_async(["--server", second.address, "snapshot", "restore",
                                 name]) == 0
        async with MeshClient(second.address) as client:
            entry = await client.get_state("config/a")
            assert entry is not None and entry.value == {"x": 1}
            assert [t.capability for t in await client.list_tasks()] == ["later"]
        # Restoring into a store that is no longer empty is refused, in one line.
        assert await main_async(["--server", second.address, "snapshot", "restore",
                                 name]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
