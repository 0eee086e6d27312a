"""Redis ChunkStore: each append is one call of ``chunks.lua``, fenced against the task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.backends.redis import codec
from server.backends.redis._client import RedisClient
from server.backends.redis._durability import NONE, Durability
from server.backends.redis._scripts import Library
from server.backends.redis.tasks import raise_fenced
from server.domain.chunks import CHUNK_LIMIT, ChunkDraft, ChunkKind, ChunkLimits, TaskChunk
from server.domain.errors import ResourceExhaustedError


class RedisChunkStore:
    """ChunkStore on Redis, sharing the key prefix of the RedisTaskStore it fences against."""

    def __init__(self, client: RedisClient, prefix: str = "agentmesh", *,
                 durability: Durability = NONE) -> None:
        self._base = "{" + prefix + "}"
        self.library = Library(client, "chunks", durability)
        """The ``chunks.lua`` library (loaded by :meth:`RedisStores.connect`, or on first use)."""

    async def append_chunks(self, task_id: str, fencing_token: int,
                            drafts: Sequence[ChunkDraft], *, now: float,
                            limits: ChunkLimits) -> list[TaskChunk]:
        """See ChunkStore.append_chunks."""
        docs = [codec.dumps(_draft_doc(d, fencing_token, now)) for d in drafts]
        reply: list[Any] = await self.library.call(
            [self._base], ["append", task_id, fencing_token, limits.max_chunks_per_task,
                           codec.fstr(limits.retention), codec.fstr(now),
                           codec.fstr(now + limits.retention), len(docs), *docs])
        raise_fenced(task_id, fencing_token, reply)
        if reply[0] == "full":
            raise ResourceExhaustedError(
                f"tasks/{task_id} has {reply[1]} chunks; at most "
                f"{limits.max_chunks_per_task} are kept per task", reason=CHUNK_LIMIT)
        first, attempt = int(reply[1]), int(reply[2])
        return [TaskChunk(task_id, first + i, fencing_token, attempt, now, d)
                for i, d in enumerate(drafts)]

    async def chunks_after(self, task_id: str, after_seq: int, limit: int, *,
                           now: float) -> list[TaskChunk]:
        """See ChunkStore.chunks_after."""
        if limit <= 0:
            return []
        start = max(0, after_seq)
        raws = await self.library.call_ro([self._base],
                                          ["range", task_id, start, limit, codec.fstr(now)])
        return [_chunk(task_id, start + 1 + i, codec.loads(r)) for i, r in enumerate(raws)]

    async def aclose(self) -> None:
        """Nothing of its own: the connection belongs to :class:`RedisStores`."""


def _draft_doc(d: ChunkDraft, token: int, now: float) -> dict[str, Any]:
    return {"f": token, "t": codec.fstr(now), "k": int(d.kind), "x": d.text,
            "d": codec.payload_to_doc(d.data), "n": d.artifact, "p": codec.fstr(d.progress),
            "l": d.last}


def _chunk(task_id: str, seq: int, doc: dict[str, Any]) -> TaskChunk:
    draft = ChunkDraft(ChunkKind(int(doc["k"])), str(doc.get("x", "")),
                       codec.payload_from_doc(doc.get("d")), str(doc.get("n", "")),
                       float(doc.get("p") or 0.0), bool(doc.get("l")))
    return TaskChunk(task_id, seq, int(doc["f"]), int(doc["a"]), float(doc["t"]), draft)
