"""A real lock holder process paused with SIGSTOP past its lease cannot write when resumed.

The holder (a subprocess speaking raw gRPC) takes a lock with a 0.5 s lease,
writes once, and is frozen with SIGSTOP. Another client's blocking acquire
gets the lock when the lease ends and writes. The holder is thawed with
SIGCONT and writes with its old fencing token: the write is refused, and
nothing else is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import grpc
from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc
from google.protobuf import duration_pb2

from server.app import Mesh

ROOT = Path(__file__).resolve().parent.parent

HOLDER = textwrap.dedent('''
    import asyncio, sys
    import grpc
    from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc
    from google.protobuf import duration_pb2

    async def main(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = state_pb2_grpc.StateServiceStub(ch)
            lease = duration_pb2.Duration(nanos=500_000_000)
            grant = await stub.AcquireLock(state_pb2.AcquireLockRequest(
                name="fenced", owner="holder", lease_duration=lease))
            token = grant.fencing_token
            await stub.Put(state_pb2.PutRequest(
                key="doc", value=common_pb2.Payload(data=b"holder-1"),
                lock="fenced", fencing_token=token))
            print("READY", token, flush=True)
            sys.stdin.readline()  # frozen here by SIGSTOP, then told to go on
            try:
                await stub.Put(state_pb2.PutRequest(
                    key="doc", value=common_pb2.Payload(data=b"holder-stale"),
                    lock="fenced", fencing_token=token))
                print("WRITTEN", flush=True)
            except grpc.aio.AioRpcError as err:
                print("REFUSED", err.code().name, flush=True)

    asyncio.run(main(sys.argv[1]))
''')


async def test_paused_holder_write_refused_after_resume(mesh: Mesh,
                                                        channel: grpc.aio.Channel) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "gen"), str(ROOT)])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, mesh.address, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(8):
            ready = (await proc.stdout.readline()).decode().split()
            assert ready[0] == "READY", ready
            old_token = int(ready[1])
            os.kill(proc.pid, signal.SIGSTOP)

            stub = state_pb2_grpc.StateServiceStub(channel)
            # Blocks until the frozen holder's 0.5 s lease ends (no sleep here).
            grant = await stub.AcquireLock(state_pb2.AcquireLockRequest(
                name="fenced", owner="successor",
                lease_duration=duration_pb2.Duration(seconds=30),
                wait_timeout=duration_pb2.Duration(seconds=5)))
            assert grant.fencing_token > old_token
            ours = await stub.Put(state_pb2.PutRequest(
                key="doc", value=common_pb2.Payload(data=b"successor-1"),
                lock="fenced", fencing_token=grant.fencing_token))

            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            verdict = (await proc.stdout.readline()).decode().split()
            assert verdict == ["REFUSED", "ABORTED"]
            assert await proc.wait() == 0

        # What was refused: only the stale write. What was lost: nothing.
        got = await stub.Get(state_pb2.GetRequest(key="doc"))
        assert got.entry.value.data == b"successor-1"
        assert got.entry.version == 2 == ours.entry.version
        history = await mesh.state.store.events_since("default", "", 0, 100)
        assert [e.entry.value.data for e in history] == [b"holder-1", b"successor-1"]
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            await proc.wait()
