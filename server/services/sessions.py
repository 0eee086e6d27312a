"""The agent sessions attached to this replica: heartbeat streams and work streams.

A session is what the server holds for an agent's open streams: the heartbeat
stream (liveness) and the work stream (credits, leases in flight). This
module holds the table and the messages a session is sent; it decides nothing.
Every way a session ends is owned by ``server/services/leases.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from server.domain.models import Lease


@dataclass(frozen=True, slots=True)
class Assignment:
    """Outbound: run this task."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Cancellation:
    """Outbound: stop this task."""

    task_id: str
    fencing_token: int
    reason: str


class ReportOutcome:
    """Outcome names of a reported result (match the proto enum)."""

    ACCEPTED = 1
    STALE_LEASE = 2
    NOT_RUNNING = 3


@dataclass(frozen=True, slots=True)
class ReportAck:
    """Outbound: what became of a reported result or failure."""

    task_id: str
    fencing_token: int
    outcome: int


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """Outbound, last: the server ended the session; the stream closes with this error.

    ``reason`` is the ``ErrorInfo.reason`` the stream's FAILED_PRECONDITION
    status carries (``SESSION_ENDED``); the agent registers again.
    """

    reason: str
    message: str


Outbound = Assignment | Cancellation | ReportAck | SessionEnded | None
"""What a work stream is sent; None closes it quietly (a newer stream replaced it)."""


@dataclass(eq=False)
class WorkerSession:
    """One agent's work stream on this replica."""

    agent_id: str
    namespace: str
    capabilities: tuple[str, ...]
    max_concurrency: int
    send: Callable[[Outbound], None]
    credits: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    """Leases sent on this stream and not yet reported: task id -> fencing token."""
    draining: bool = False
    closed: bool = False
    ack_reports: bool = False
    """The agent asked for an ack of every report, accepted ones included."""

    @property
    def load(self) -> float:
        """In-flight share of the concurrency limit."""
        return len(self.in_flight) / max(1, self.max_concurrency)


@dataclass(eq=False)
class HeartbeatSession:
    """One agent's heartbeat stream on this replica."""

    agent_id: str
    send_drain: Callable[[str, float, bool], None]
    """Send a drain directive (reason, grace period in seconds, leave: an operator's
    drain, the agent should stop rather than reconnect)."""
    end: Callable[[SessionEnded], None]
    """End the stream with this error."""


def add_credits(session: WorkerSession, count: int) -> None:
    """The agent can take ``count`` more tasks.

    Credits never exceed the agent's free slots (max concurrency minus
    in-flight), so a redundant grant can never over-assign.
    """
    free = session.max_concurrency - len(session.in_flight)
    session.credits = max(0, min(session.credits + count, free))


class SessionTable:
    """The sessions of this replica by agent id (one work and one heartbeat stream each)."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerSession] = {}
        self._heartbeats: dict[str, HeartbeatSession] = {}

    # -- work streams ----------------------------------------------------------------

    def worker(self, agent_id: str) -> WorkerSession | None:
        """The current work session of an agent here, if any."""
        return self._workers.get(agent_id)

    def workers(self) -> Iterator[WorkerSession]:
        """Every current work session (a snapshot: safe to end sessions meanwhile)."""
        return iter(list(self._workers.values()))

    def put_worker(self, session: WorkerSession) -> WorkerSession | None:
        """Make ``session`` the agent's work session; returns the one it replaces."""
        old = self._workers.get(session.agent_id)
        self._workers[session.agent_id] = session
        return old

    def drop_worker(self, session: WorkerSession) -> bool:
        """Forget ``session``; False when a newer stream had replaced it already."""
        if self._workers.get(session.agent_id) is session:
            del self._workers[session.agent_id]
            return True
        return False

    def in_flight(self) -> int:
        """Tasks running on agents attached here."""
        return sum(len(s.in_flight) for s in self._workers.values())

    # -- heartbeat streams -----------------------------------------------------------

    def heartbeat(self, agent_id: str) -> HeartbeatSession | None:
        """The agent's heartbeat stream here, if any."""
        return self._heartbeats.get(agent_id)

    def heartbeats(self) -> list[HeartbeatSession]:
        """Every heartbeat stream here (a snapshot)."""
        return list(self._heartbeats.values())

    def put_heartbeat(self, session: HeartbeatSession) -> bool:
        """Attach a heartbeat stream; False when the agent already has one here."""
        if session.agent_id in self._heartbeats:
            return False
        self._heartbeats[session.agent_id] = session
        return True

    def drop_heartbeat(self, session: HeartbeatSession) -> bool:
        """Forget a heartbeat stream; False when it was not the attached one."""
        if self._heartbeats.get(session.agent_id) is session:
            del self._heartbeats[session.agent_id]
            return True
        return False


__all__ = [
    "Assignment",
    "Cancellation",
    "HeartbeatSession",
    "Outbound",
    "ReportAck",
    "ReportOutcome",
    "SessionEnded",
    "SessionTable",
    "WorkerSession",
    "add_credits",
]
