"""Scheduler session bookkeeping, driven directly (no gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from server.backends.memory import InMemoryAgentRegistry, InMemoryTaskStore
from server.bus.memory import InProcessBus
from server.domain.models import Agent, AgentState, Capability, Lease, Task, TaskState
from server.services.clock import ManualClock
from server.services.scheduler import Scheduler
from server.services.sessions import Assignment, Outbound, WorkerSession


async def test_replaced_stream_hands_back_only_its_own_leases() -> None:
    clock = ManualClock()
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = InMemoryTaskStore(agents=agents)
    await agents.register(Agent(id="a1", display_name="a", capabilities=(Capability("c"),),
                                max_concurrency=1, heartbeat_time=clock.now(),
                                expire_time=clock.now() + 60))
    scheduler = Scheduler(tasks, agents, bus, clock)
    await scheduler.start()
    try:
        sent_old: list[Outbound] = []
        sent_new: list[Outbound] = []
        old = WorkerSession("a1", "default", ("c",), 1, sent_old.append)
        await scheduler.open_session(old)
        scheduler.grant(old, 1)
        await scheduler.submit(Task(id="t1", capability="c"))
        await _until(lambda: any(isinstance(m, Assignment) for m in sent_old))
        # The same agent opens a second stream; it replaces the first.
        new = WorkerSession("a1", "default", ("c",), 1, sent_new.append)
        await scheduler.open_session(new)
        scheduler.grant(new, 1)
        await scheduler.submit(Task(id="t2", capability="c"))
        await _until(lambda: any(isinstance(m, Assignment) for m in sent_new))
        t2_token = new.in_flight["t2"]
        # Now the replaced stream finishes closing.
        await scheduler.close_session(old)
        t1 = await tasks.get_task("t1")
        t2 = await tasks.get_task("t2")
        assert t1 is not None and t1.state is TaskState.QUEUED, "the old stream's lease went back"
        assert t2 is not None and t2.state is TaskState.RUNNING and t2.fencing_token == t2_token
        assert new.in_flight == {"t2": t2_token}, "the new stream keeps its lease"
    finally:
        await scheduler.stop()
        await bus.aclose()


async def _until(cond: object, limit: float = 2.0) -> None:
    """Wait for a side effect of the scheduler's own loop (no event to await)."""
    async with asyncio.timeout(limit):
        while True:
            if cond():  # type: ignore[operator]
                return
            await asyncio.sleep(0.005)


class _SwallowingStore(InMemoryTaskStore):
    """A store whose lease reaper swallows a cancellation, as nats-py's publish
    flush does and as Python 3.11's ``wait_for`` can: the caller goes on."""

    def __init__(self, agents: InMemoryAgentRegistry) -> None:
        super().__init__(agents=agents)
        self.entered = asyncio.Event()

    async def expired_leases(self, now: float, limit: int) -> list[Task]:
        self.entered.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # the library's bug, not ours
        return []


async def test_stop_ends_even_when_a_call_swallows_the_cancellation() -> None:
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = _SwallowingStore(agents)
    scheduler = Scheduler(tasks, agents, bus, ManualClock())
    await scheduler.start()
    try:
        await asyncio.wait_for(tasks.entered.wait(), 2)
        tasks.entered.clear()
        # Catch the maintenance pass inside the store call, then stop: the
        # swallowed cancellation must still end the loop (and so stop()).
        await asyncio.wait_for(tasks.entered.wait(), 2)
        async with asyncio.timeout(5):
            await scheduler.stop()
    finally:
        await bus.aclose()


async def test_breaker_successes_are_broadcast_only_when_some_breaker_holds_state() -> None:
    from server.services import events  # noqa: PLC0415
    from server.services.breakers import BreakerBoard, BreakerConfig  # noqa: PLC0415

    bus = InProcessBus()
    a = BreakerBoard(bus, BreakerConfig(fail_max=3), replica="A")
    b = BreakerBoard(bus, BreakerConfig(fail_max=3), replica="B")
    seen = await bus.subscribe(events.BREAKER_ALL)
    await a.start()
    await b.start()
    try:
        # A clean success changes nothing anywhere: nothing is published.
        await a.record("default", "ag", "cap", ok=True)
        # A failure is published; B then holds a breaker with one failure.
        await a.record("default", "ag", "cap", ok=False)
        first = await asyncio.wait_for(anext(aiter(seen)), 2)
        assert events.decode(first.data)["ok"] is False, "the clean success was not sent"
        await _until(lambda: ("ag", "cap") in b._breakers)
        # A success now resets the failure on every replica, so it is published.
        await a.record("default", "ag", "cap", ok=True)
        second = await asyncio.wait_for(anext(aiter(seen)), 2)
        assert events.decode(second.data)["ok"] is True
        await _until(lambda: ("ag", "cap") not in b._breakers)
    finally:
        await a.stop()
        await b.stop()
        await bus.aclose()


class _CountingStore(InMemoryTaskStore):
    """Counts the batched reads watchers make."""

    def __init__(self, agents: InMemoryAgentRegistry) -> None:
        super().__init__(agents=agents)
        self.reads: list[list[str]] = []

    async def get_tasks(self, task_ids: Sequence[str]) -> list[Task | None]:
        self.reads.append(list(task_ids))
        return await super().get_tasks(task_ids)


async def test_watch_uses_the_versions_this_replica_made_and_reads_the_rest() -> None:
    from server.services import events  # noqa: PLC0415

    clock = ManualClock()
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = _CountingStore(agents)
    scheduler = Scheduler(tasks, agents, bus, clock)
    await scheduler.start()
    watch = scheduler.watch_task_batches("default", states=frozenset({int(TaskState.QUEUED)}),
                                         max_batch=10)
    try:
        first = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0)  # let the watch subscribe
        await scheduler.submit(Task(id="mine", capability="c"))
        got = await asyncio.wait_for(first, 2)
        stored = await tasks.get_task("mine")
        assert got == [stored] and tasks.reads == [], "a version made here needs no read"
        # A change made elsewhere (another replica) carries a version not held here.
        clock.advance(1.0)
        await events.announce(bus, events.task_subject("default", int(TaskState.QUEUED)),
                              events.task_event("mine", int(TaskState.QUEUED), "", "c",
                                                clock.now()))
        again = await asyncio.wait_for(anext(watch), 2)
        assert again == [stored] and tasks.reads == [["mine"]], "an unknown version is read"
    finally:
        await watch.aclose()
        await scheduler.stop()
        await bus.aclose()


async def test_a_lease_delivered_on_an_earlier_stream_is_adopted_not_refused() -> None:
    """The agent's first work stream (replica A) broke after a lease reached it; it
    reconnected to replica B and reports there. The store holds the lease for this
    agent under this token, so the report is accepted (it used to be refused
    STALE_LEASE while the lease was live: nemesis, Redis + NATS, two replicas).
    Another agent's report under the same token is still refused."""
    from server.domain.models import Payload  # noqa: PLC0415
    from server.services.sessions import ReportOutcome  # noqa: PLC0415

    clock = ManualClock()
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = InMemoryTaskStore(agents=agents)
    for agent_id in ("a1", "a2"):
        await agents.register(Agent(id=agent_id, display_name=agent_id,
                                    capabilities=(Capability("c"),), max_concurrency=1,
                                    heartbeat_time=clock.now(), expire_time=clock.now() + 60))
    replica_a, replica_b = (Scheduler(tasks, agents, bus, clock) for _ in range(2))
    await replica_a.start()
    await replica_b.start()
    try:
        sent_a: list[Outbound] = []
        on_a = WorkerSession("a1", "default", ("c",), 1, sent_a.append)
        await replica_a.open_session(on_a)
        replica_a.grant(on_a, 1)
        await replica_a.submit(Task(id="t1", capability="c"))
        await _until(lambda: any(isinstance(m, Assignment) for m in sent_a))
        token = on_a.in_flight["t1"]
        on_b = WorkerSession("a1", "default", ("c",), 1, [].append)
        other = WorkerSession("a2", "default", ("c",), 1, [].append)
        await replica_b.open_session(on_b)
        await replica_b.open_session(other)
        refused = await replica_b.leases.report_results(other, [("t1", token, Payload(b"x"))])
        assert refused == [ReportOutcome.STALE_LEASE], "another agent's report is refused"
        assert "t1" not in other.in_flight
        accepted = await replica_b.leases.report_results(on_b, [("t1", token, Payload(b"ok"))])
        assert accepted == [ReportOutcome.ACCEPTED]
        done = await tasks.get_task("t1")
        assert done is not None and done.state is TaskState.SUCCEEDED
        assert done.output.data == b"ok" and done.fencing_token == token
        assert on_b.in_flight == {}, "the adopted lease's slot was returned"
        again = await replica_b.leases.report_results(on_b, [("t1", token, Payload(b"2"))])
        assert again == [ReportOutcome.NOT_RUNNING], "a second report is not accepted twice"
    finally:
        await replica_a.stop()
        await replica_b.stop()
        await bus.aclose()


class _SlowGone(InMemoryAgentRegistry):
    """A registry whose state write takes a second of the manual clock (a slow store)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__()
        self.clock = clock
        self.stored_at = 0.0

    async def set_state(self, agent_id: str, state: AgentState, *, now: float) -> Agent | None:
        self.clock.advance(1.0)
        agent = await super().set_state(agent_id, state, now=now)
        self.stored_at = self.clock.now()
        return agent


async def test_the_left_event_is_stamped_after_gone_is_stored() -> None:
    """A LEFT event's time bounds the leases an agent can have been granted: any
    lease stamped later was refused by the store. It was stamped before the GONE
    write, so a slow store made the bound too early (nemesis, Redis + NATS)."""
    from server.services import events  # noqa: PLC0415

    clock = ManualClock()
    agents, bus = _SlowGone(clock), InProcessBus()
    tasks = InMemoryTaskStore(agents=agents)
    await agents.register(Agent(id="a1", display_name="a", capabilities=(Capability("c"),),
                                heartbeat_time=clock.now(), expire_time=clock.now() + 60))
    scheduler = Scheduler(tasks, agents, bus, clock)
    seen = await bus.subscribe(events.agent_subject("default"))
    await scheduler.start()
    try:
        assert await scheduler.leases.mark_gone("a1", "test")
        while True:
            body = events.decode((await asyncio.wait_for(anext(aiter(seen)), 2)).data)
            if body["type"] == events.AgentEventType.LEFT:
                break
        assert body["time"] >= agents.stored_at, "stamped once GONE was stored"
    finally:
        await scheduler.stop()
        await bus.aclose()


class _LeaseCountingStore(InMemoryTaskStore):
    """Counts lease calls per agent."""

    def __init__(self, agents: InMemoryAgentRegistry) -> None:
        super().__init__(agents=agents)
        self.lease_calls: dict[str, int] = {}

    async def lease_batch(self, namespace: str, capabilities: Sequence[str], agent_id: str,
                          **kwargs: object) -> list[Lease]:
        self.lease_calls[agent_id] = self.lease_calls.get(agent_id, 0) + 1
        return await super().lease_batch(namespace, capabilities, agent_id,  # type: ignore[arg-type]
                                         **kwargs)


async def test_another_replicas_work_wakes_only_a_replica_that_could_take_it() -> None:
    """Replica B's agent serves other work: A's submits cost B no store call.

    On the previous code every replica woke on every submit anywhere and spent a
    lease call per session with credits (throughput fell from 1 to 3 replicas).
    A task whose fallback B's agent serves still wakes B, which takes it.
    """
    clock = ManualClock()
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = _LeaseCountingStore(agents)
    for agent_id, cap in (("a1", "c"), ("b1", "y")):
        await agents.register(Agent(id=agent_id, display_name=agent_id,
                                    capabilities=(Capability(cap),), max_concurrency=50,
                                    heartbeat_time=clock.now(), expire_time=clock.now() + 60))
    a, b = Scheduler(tasks, agents, bus, clock), Scheduler(tasks, agents, bus, clock)
    await a.start()
    await b.start()
    try:
        sent_a: list[Outbound] = []
        sent_b: list[Outbound] = []
        sa = WorkerSession("a1", "default", ("c",), 50, sent_a.append)
        sb = WorkerSession("b1", "default", ("y",), 50, sent_b.append)
        await a.open_session(sa)
        await b.open_session(sb)
        a.grant(sa, 50)
        b.grant(sb, 50)
        await _until(lambda: "b1" in tasks.lease_calls)  # b's own first round (empty)
        await asyncio.sleep(0.05)
        before = tasks.lease_calls["b1"]
        for i in range(20):
            await a.submit(Task(id=f"t{i}", capability="c"))
        await _until(lambda: sum(isinstance(m, Assignment) for m in sent_a) == 20)
        await asyncio.sleep(0.1)  # time for every bus message to reach b
        assert tasks.lease_calls["b1"] == before, "b spent store calls on work it cannot take"
        assert not any(isinstance(m, Assignment) for m in sent_b)
        # A task b's agent can take as a fallback (nobody offers "x") wakes b.
        await a.submit(Task(id="fb", capability="x", fallback_capability="y"))
        await _until(lambda: any(isinstance(m, Assignment) and m.lease.task.id == "fb"
                                 for m in sent_b))
    finally:
        await a.stop()
        await b.stop()
        await bus.aclose()


async def test_work_a_replica_absorbs_wakes_no_other_and_the_rest_is_offered() -> None:
    """Both replicas serve "c": A's agent takes what it has slots for, B the rest.

    On the previous code B woke on every one of A's submits and spent a lease
    call each time. The clock never moves, so no periodic re-check can be what
    hands B its share: only A's offer of the work its agent could not take.
    """
    clock = ManualClock()
    agents, bus = InMemoryAgentRegistry(), InProcessBus()
    tasks = _LeaseCountingStore(agents)
    for agent_id in ("a1", "b1"):
        await agents.register(Agent(id=agent_id, display_name=agent_id,
                                    capabilities=(Capability("c"),), max_concurrency=50,
                                    heartbeat_time=clock.now(), expire_time=clock.now() + 60))
    a, b = Scheduler(tasks, agents, bus, clock), Scheduler(tasks, agents, bus, clock)
    await a.start()
    await b.start()
    try:
        sent_a: list[Outbound] = []
        sent_b: list[Outbound] = []
        sa = WorkerSession("a1", "default", ("c",), 50, sent_a.append)
        sb = WorkerSession("b1", "default", ("c",), 50, sent_b.append)
        await a.open_session(sa)
        await b.open_session(sb)
        a.grant(sa, 11)
        b.grant(sb, 50)
        await _until(lambda: "b1" in tasks.lease_calls)
        await asyncio.sleep(0.05)
        before = tasks.lease_calls["b1"]
        for i in range(10):
            await a.submit(Task(id=f"t{i}", capability="c"))
        await _until(lambda: sum(isinstance(m, Assignment) for m in sent_a) == 10)
        await asyncio.sleep(0.1)
        assert tasks.lease_calls["b1"] == before, "b was woken for work a's agent took"
        # a's agent has one slot left: of what a queues now, b gets the rest.
        await a.submit_many([(Task(id=f"t{i}", capability="c"), "") for i in range(10, 16)])
        await _until(lambda: sum(isinstance(m, Assignment) for m in sent_b) == 5)
        got_a = {m.lease.task.id for m in sent_a if isinstance(m, Assignment)}
        got_b = {m.lease.task.id for m in sent_b if isinstance(m, Assignment)}
        assert len(got_a) == 11 and not got_a & got_b
        assert got_a | got_b == {f"t{i}" for i in range(16)}
    finally:
        await a.stop()
        await b.stop()
        await bus.aclose()
