"""Fenced locks and snapshots on the client side."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent_sdk.errors import AgentMeshError, RPCError

if TYPE_CHECKING:
    from agent_sdk._client import MeshClient
    from agent_sdk._types import StateEntry

log = logging.getLogger(__name__)

__all__ = ["Lock", "LockLostError", "SnapshotInfo"]


class LockLostError(AgentMeshError):
    """The lock was lost (its lease ended or another holder took it): the write was not sent."""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A stored snapshot of the mesh's state and task records."""

    name: str
    create_time: dt.datetime | None
    size_bytes: int
    namespace: str
    revisions: dict[str, int]
    entry_count: int
    task_count: int
    workflow_count: int


class Lock:
    """A held lock: its fencing token, and writes fenced by it.

    Obtained from ``async with client.lock(name, lease=...) as lock``. The lease
    is renewed in the background every third of its length. Once renewal fails
    for good (another holder took it, or the lease ran out) ``lost`` is set and
    every write through the lock raises :class:`LockLostError` without being
    sent; a write already in flight is refused by the server, because its
    fencing token is no longer current.
    """

    def __init__(self, client: MeshClient, name: str, fencing_token: int, lease: float,
                 expire_time: dt.datetime | None) -> None:
        """Wrap a granted lock."""
        self.client = client
        self.name = name
        self.fencing_token = fencing_token
        self.lease = lease
        self.expire_time = expire_time
        self.lost = asyncio.Event()

    def _check(self) -> None:
        if self.lost.is_set():
            raise LockLostError(f"lock {self.name!r} was lost; the write was not sent")

    async def put(self, key: str, value: Any, *, expected_version: int | None = None,
                  ttl: float | None = None) -> StateEntry:
        """``put_state`` fenced by this lock."""
        self._check()
        return await self.client.put_state(key, value, expected_version=expected_version,
                                           ttl=ttl, lock=self.name,
                                           fencing_token=self.fencing_token)

    async def delete(self, key: str, *, expected_version: int | None = None) -> int:
        """``delete_state`` fenced by this lock."""
        self._check()
        return await self.client.delete_state(key, expected_version=expected_version,
                                              lock=self.name, fencing_token=self.fencing_token)

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                self.expire_time = await self.client.renew_lock(self.name, self.fencing_token,
                                                                lease=self.lease)
                deadline = loop.time() + self.lease
            except RPCError as exc:
                if exc.code.name in ("ABORTED", "NOT_FOUND", "FAILED_PRECONDITION") or (
                        loop.time() >= deadline):
                    log.warning("lock %s lost: %s", self.name, exc)
                    self.lost.set()
                    return
                log.info("renewing lock %s failed (%s); retrying", self.name, exc)


@contextlib.asynccontextmanager
async def hold(client: MeshClient, name: str, *, lease: float, wait: float,
               owner: str) -> Any:
    """Acquire, renew in the background, release on exit (see ``MeshClient.lock``)."""
    token, expire = await client.acquire_lock(name, lease=lease, wait=wait, owner=owner)
    lock = Lock(client, name, token, lease, expire)
    renewer = asyncio.create_task(lock._renew_forever())
    try:
        yield lock
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        if not lock.lost.is_set():
            with contextlib.suppress(RPCError):
                await client.release_lock(name, token)
