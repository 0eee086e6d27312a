"""StateService benchmark: CAS Put/Get and contended locks through gRPC.

Starts an embedded mesh (memory store, or Redis with ``--redis URL``) in this
process and drives it with raw gRPC stubs over loopback. Prints one JSON line
per figure::

    .venv/bin/python loadtests/state_bench.py --seconds 5 [--redis redis://127.0.0.1:6379/0]

Figures: ``cas_put`` (read-modify-write with expected_version, each client on
its own key, ops/s of successful Puts), ``get`` (ops/s), ``lock`` (acquire +
release cycles/s of 50 clients contending for ONE lock with blocking acquire).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import grpc
from agentmesh.v1 import common_pb2, state_pb2, state_pb2_grpc
from google.protobuf import duration_pb2

from server.app import running_server
from server.backends.redis import RedisStores
from server.settings import Settings


def _settings(store: str, prefix: str) -> Settings:
    return Settings(port=0, metrics_port=0, console_port=0, store=store, key_prefix=prefix,
                    blob="/tmp/agentmesh-bench-snapshots")


async def _cas(stub: state_pb2_grpc.StateServiceStub, clients: int,
               seconds: float) -> dict[str, float]:
    stop = time.monotonic() + seconds
    puts = gets = conflicts = 0

    async def client(c: int) -> None:
        nonlocal puts, gets, conflicts
        key = f"bench/{c}"
        version = 0
        while time.monotonic() < stop:
            try:
                resp = await stub.Put(state_pb2.PutRequest(
                    key=key, value=common_pb2.Payload(data=str(version).encode()),
                    expected_version=version))
                version = resp.entry.version
                puts += 1
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.ABORTED:
                    raise
                conflicts += 1
            got = await stub.Get(state_pb2.GetRequest(key=key))
            version = got.entry.version
            gets += 1

    start = time.monotonic()
    await asyncio.gather(*[client(c) for c in range(clients)])
    took = time.monotonic() - start
    return {"cas_put_ops_s": round(puts / took, 1), "get_ops_s": round(gets / took, 1),
            "conflicts": conflicts, "clients": clients, "seconds": round(took, 2)}


async def _locks(stub: state_pb2_grpc.StateServiceStub, clients: int,
                 seconds: float) -> dict[str, float]:
    stop = time.monotonic() + seconds
    cycles = timeouts = 0
    tokens: list[int] = []
    lease = duration_pb2.Duration(seconds=10)
    wait = duration_pb2.Duration(seconds=2)

    async def client(c: int) -> None:
        nonlocal cycles, timeouts
        while time.monotonic() < stop:
            try:
                grant = await stub.AcquireLock(state_pb2.AcquireLockRequest(
                    name="contended", owner=f"c{c}", lease_duration=lease, wait_timeout=wait))
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.ABORTED:
                    raise
                timeouts += 1
                continue
            tokens.append(grant.fencing_token)
            await stub.ReleaseLock(state_pb2.ReleaseLockRequest(
                name="contended", fencing_token=grant.fencing_token))
            cycles += 1

    start = time.monotonic()
    await asyncio.gather(*[client(c) for c in range(clients)])
    took = time.monotonic() - start
    return {"lock_cycles_s": round(cycles / took, 1), "acquire_timeouts": timeouts,
            "clients": clients, "seconds": round(took, 2),
            "tokens_unique": len(set(tokens)) == len(tokens)}


async def run(store: str, seconds: float, cas_clients: int, lock_clients: int) -> None:
    """Run both figures against one store and print JSON lines."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    backend = "redis" if store.startswith("redis") else "memory"
    try:
        async with running_server(_settings(store, prefix)) as mesh, \
                grpc.aio.insecure_channel(mesh.address) as ch:
            stub = state_pb2_grpc.StateServiceStub(ch)
            cas = await _cas(stub, cas_clients, seconds)
            print(json.dumps({"bench": "state_cas", "backend": backend, **cas}), flush=True)
            locks = await _locks(stub, lock_clients, seconds)
            print(json.dumps({"bench": "state_lock", "backend": backend, **locks}), flush=True)
    finally:
        if backend == "redis":
            stores = await RedisStores.connect(store, prefix=prefix)
            await stores.delete_all_keys()
            await stores.aclose()


def main() -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cas-clients", type=int, default=16)
    parser.add_argument("--lock-clients", type=int, default=50)
    parser.add_argument("--redis", default="", help="also run on this Redis URL")
    args = parser.parse_args()
    asyncio.run(run("memory://", args.seconds, args.cas_clients, args.lock_clients))
    if args.redis:
        asyncio.run(run(args.redis, args.seconds, args.cas_clients, args.lock_clients))


if __name__ == "__main__":
    main()
