"""Streamed partial results: the chunks a running attempt emits, and their bounds.

A handler emits chunks (LLM tokens, pieces of an artifact, progress notes)
while it runs. The store keeps them per task in a log numbered from 1 with no
gaps (``TaskChunk.seq``), so a watcher that reconnects with the last number it
received resumes exactly there. Each chunk carries the fencing token of the
lease that produced it; a chunk of a stale lease is refused like a stale result.

Pure values and rules, no I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from server.domain.errors import FieldViolation, InvalidArgumentError
from server.domain.models import EMPTY_PAYLOAD, Payload

CHUNK_TOO_LARGE = "CHUNK_TOO_LARGE"
"""Reason of a chunk over ``ChunkLimits.max_chunk_bytes`` (INVALID_ARGUMENT)."""
CHUNK_LIMIT = "CHUNK_LIMIT"
"""Reason of a chunk past ``ChunkLimits.max_chunks_per_task`` (RESOURCE_EXHAUSTED)."""
DEFAULT_ARTIFACT = "output"
_ARTIFACT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ChunkKind(enum.IntEnum):
    """What a chunk carries (values match the proto enum)."""

    TEXT = 1
    ARTIFACT = 2
    PROGRESS = 3


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    """A chunk as the agent sends it (before the store numbers it)."""

    kind: ChunkKind
    text: str = ""
    data: Payload = EMPTY_PAYLOAD
    artifact: str = DEFAULT_ARTIFACT
    progress: float = 0.0
    last: bool = False

    @property
    def size(self) -> int:
        """Bytes counted against ``max_chunk_bytes``."""
        return len(self.text.encode()) + self.data.size + len(self.artifact)


@dataclass(frozen=True, slots=True)
class TaskChunk:
    """A chunk as kept: numbered, with the lease and attempt that produced it."""

    task_id: str
    seq: int
    fencing_token: int
    attempt: int
    create_time: float
    draft: ChunkDraft


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """Bounds of the chunk log (from settings)."""

    max_chunk_bytes: int = 64 * 1024
    max_chunks_per_task: int = 10_000
    retention: float = 86_400.0
    """Seconds a task's chunks are kept after its last chunk."""
    max_batch: int = 1000
    """Most chunks in one append."""


DEFAULT_CHUNK_LIMITS = ChunkLimits()


def check_drafts(drafts: list[ChunkDraft], limits: ChunkLimits, field: str) -> None:
    """INVALID_ARGUMENT naming the first bad chunk (``<field>[i].<what>``)."""
    if not drafts:
        raise InvalidArgumentError.field(field, "at least one chunk")
    if len(drafts) > limits.max_batch:
        raise InvalidArgumentError.field(field, f"at most {limits.max_batch} chunks at once")
    for i, d in enumerate(drafts):
        where = f"{field}[{i}]"
        if not _ARTIFACT_RE.match(d.artifact):
            raise InvalidArgumentError.field(
                f"{where}.artifact", "letters, digits, '-', '_', '.'; 1 to 64 characters")
        if not 0.0 <= d.progress <= 1.0:
            raise InvalidArgumentError.field(f"{where}.progress", "must be within 0..1")
        if d.size > limits.max_chunk_bytes:
            what = "data" if d.kind is ChunkKind.ARTIFACT else "text"
            raise InvalidArgumentError(
                f"{where}.{what}: the chunk is {d.size} bytes; at most "
                f"{limits.max_chunk_bytes} are kept per chunk",
                [FieldViolation(f"{where}.{what}",
                                f"at most {limits.max_chunk_bytes} bytes per chunk")],
                reason=CHUNK_TOO_LARGE)


__all__ = [
    "CHUNK_LIMIT",
    "CHUNK_TOO_LARGE",
    "DEFAULT_ARTIFACT",
    "DEFAULT_CHUNK_LIMITS",
    "ChunkDraft",
    "ChunkKind",
    "ChunkLimits",
    "TaskChunk",
    "check_drafts",
]
