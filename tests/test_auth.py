"""Authentication, the role table, namespace binding, agent identity and audit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from agentmesh.v1 import (
    bus_pb2,
    bus_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent_sdk import Agent, ChannelConfig, MeshClient, PermissionDeniedError, TaskContext
from server.api.auth import (
    OWNER_LABEL,
    PUBLIC_METHODS,
    RPC_ROLES,
    AuthFileError,
    Role,
    TokenTable,
    generate_token,
    hash_token,
)
from server.app import Mesh, running_server
from server.cli import main
from tests._rpcs import ALL_RPCS, bearer, call_raw
from tests._services import free_port
from tests.conftest import embedded_settings

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

PRINCIPALS: dict[str, tuple[str, list[str]]] = {
    "root": ("admin", ["*"]),
    "any-client": ("client", ["*"]),
    "any-agent": ("agent", ["*"]),
    "any-viewer": ("viewer", ["*"]),
    "alice": ("client", ["team-a"]),
    "carol": ("client", ["team-a"]),
    "bob": ("client", ["team-b"]),
    "agent-a": ("agent", ["team-a"]),
    "agent-a2": ("agent", ["team-a"]),
    "agent-b": ("agent", ["team-b"]),
}
TOKENS = {name: generate_token() for name in PRINCIPALS}
ROLE_PRINCIPAL = {Role.ADMIN: "root", Role.CLIENT: "any-client", Role.AGENT: "any-agent",
                  Role.VIEWER: "any-viewer"}


def write_auth_file(path: Path) -> Path:
    """An auth file with every principal of PRINCIPALS (hashed tokens only)."""
    doc = {"principals": [
        {"name": name, "role": role, "namespaces": spaces, "token_sha256": hash_token(TOKENS[name])}
        for name, (role, spaces) in PRINCIPALS.items()]}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Mesh]:
    """A mesh with authentication on."""
    settings = embedded_settings(auth_file=str(write_auth_file(tmp_path / "tokens.yaml")),
                                 blob=str(tmp_path / "snapshots"))
    async with running_server(settings) as mesh:
        yield mesh


def md(name: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a principal."""
    return bearer(TOKENS[name])


# -- authentication -----------------------------------------------------------------


async def test_every_rpc_needs_a_known_token(secured: Mesh) -> None:
    async with grpc.aio.insecure_channel(secured.address) as ch:
        for rpc in ALL_RPCS:
            assert await call_raw(ch, rpc, [b""]) == UNAUTH, rpc.name
            assert await call_raw(ch, rpc, [b""], metadata=bearer("amt_nope")) == UNAUTH, \
                rpc.name
            assert await call_raw(ch, rpc, [b""], metadata=(
                ("authorization", f"Basic {TOKENS['root']}"),)) == UNAUTH, rpc.name


async def test_health_and_reflection_need_no_token(secured: Mesh) -> None:
    async with grpc.aio.insecure_channel(secured.address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "/grpc.health.v1.Health/Check" in PUBLIC_METHODS
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in PUBLIC_METHODS


# -- the role table ------------------------------------------------------------------


def test_role_table_covers_every_rpc_and_nothing_else() -> None:
    paths = {rpc.path for rpc in ALL_RPCS}
    missing = paths - set(RPC_ROLES)
    assert not missing, f"RPCs without an access rule: {sorted(missing)}"
    assert set(RPC_ROLES) <= paths, "rules for RPCs that do not exist"
    for path, roles in RPC_ROLES.items():
        assert Role.ADMIN in roles, f"admin may do everything: {path}"
    for admin_only in ("RetryTask", "RestoreSnapshot", "CreateSnapshot", "ListSnapshots"):
        (path,) = [p for p in RPC_ROLES if p.endswith("/" + admin_only)]
        assert RPC_ROLES[path] == {Role.ADMIN}


async def test_role_table_is_enforced_for_every_rpc_and_role(secured: Mesh) -> None:
    """Allowed: never PERMISSION_DENIED/UNAUTHENTICATED; refused: PERMISSION_DENIED."""
    async with grpc.aio.insecure_channel(secured.address) as ch:
        for rpc in ALL_RPCS:
            for role in Role:
                code = await call_raw(ch, rpc, [b""], metadata=md(ROLE_PRINCIPAL[role]),
                                      deadline=1.0)
                if role in RPC_ROLES[rpc.path]:
                    assert code not in (DENIED, UNAUTH), (rpc.name, role, code)
                else:
                    assert code == DENIED, (rpc.name, role, code)


# -- namespaces ----------------------------------------------------------------------


def submit(ns: str, cap: str = "work") -> task_pb2.SubmitTaskRequest:
    return task_pb2.SubmitTaskRequest(task=task_pb2.Task(
        capability=cap, namespace=ns, input=common_pb2.Payload(data=b"{}")))


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_namespaces_are_bound_and_invisible(secured: Mesh) -> None:
    async with grpc.aio.insecure_channel(secured.address) as ch:
        t = task_pb2_grpc.TaskServiceStub(ch)
        mine = (await t.SubmitTask(submit("team-a"), metadata=md("alice"))).task
        assert mine.labels[OWNER_LABEL] == "alice"
        theirs = (await t.SubmitTask(submit("team-b"), metadata=md("bob"))).task
        # Naming another namespace is refused.
        assert await code_of(t.SubmitTask(submit("team-b"), metadata=md("alice"))) == DENIED
        assert await code_of(t.SubmitTask(submit(""), metadata=md("alice"))) == DENIED
        assert await code_of(t.ListTasks(task_pb2.ListTasksRequest(namespace="team-b"),
                                         metadata=md("alice"))) == DENIED
        assert await code_of(t.BatchSubmitTasks(task_pb2.BatchSubmitTasksRequest(
            requests=[submit("team-a"), submit("team-b")]), metadata=md("alice"))) == DENIED
        assert await code_of(t.GetStats(task_pb2.GetStatsRequest(namespace="team-b"),
                                        metadata=md("alice"))) == DENIED
        watch = t.WatchTasks(task_pb2.WatchTasksRequest(namespace="team-b"),
                             metadata=md("alice"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch.read()
        assert err.value.code() == DENIED
        # A bidi stream names its namespace in its first message: checked there.
        b = bus_pb2_grpc.BusServiceStub(ch)

        async def opens(ns: str) -> AsyncIterator[bus_pb2.SubscribeDurableRequest]:
            yield bus_pb2.SubscribeDurableRequest(open=bus_pb2.DurableOpen(
                namespace=ns, subject="jobs.>", durable_name="d"))
            await asyncio.sleep(30)  # keep the request side open

        denied = b.SubscribeDurable(opens("team-b"), metadata=md("alice"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await denied.read()
        assert err.value.code() == DENIED
        allowed = b.SubscribeDurable(opens("team-a"), metadata=md("alice"))
        await asyncio.wait_for(allowed.initial_metadata(), 10)  # the consumer exists
        allowed.cancel()
        # Resources of another namespace, named by id, do not exist for the caller.
        assert await code_of(t.GetTask(task_pb2.GetTaskRequest(name=theirs.name),
                                       metadata=md("alice"))) == grpc.StatusCode.NOT_FOUND
        assert await code_of(t.CancelTask(task_pb2.CancelTaskRequest(name=theirs.name),
                                          metadata=md("alice"))) == grpc.StatusCode.NOT_FOUND
        # Lists only show the caller's namespace.
        listed = await t.ListTasks(task_pb2.ListTasksRequest(namespace="team-a"),
                                   metadata=md("alice"))
        assert [x.name for x in listed.tasks] == [mine.name]
        # The owner label cannot be forged.
        forged = submit("team-a")
        forged.task.labels[OWNER_LABEL] = "bob"
        got = (await t.SubmitTask(forged, metadata=md("alice"))).task
        assert got.labels[OWNER_LABEL] == "alice"


async def test_cancel_of_others_work_is_admin_only_and_audited(
        secured: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agentmesh.audit")
    async with grpc.aio.insecure_channel(secured.address) as ch:
        t = task_pb2_grpc.TaskServiceStub(ch)
        task = (await t.SubmitTask(submit("team-a"), metadata=md("alice"))).task
        other = (await t.SubmitTask(submit("team-a"), metadata=md("alice"))).task
        assert await code_of(t.CancelTask(task_pb2.CancelTaskRequest(name=task.name),
                                          metadata=md("carol"))) == DENIED
        await t.CancelTask(task_pb2.CancelTaskRequest(name=other.name), metadata=md("alice"))
        await t.CancelTask(task_pb2.CancelTaskRequest(name=task.name), metadata=md("root"))
        assert await code_of(t.RetryTask(task_pb2.RetryTaskRequest(name=task.name),
                                         metadata=md("alice"))) == DENIED
        await t.RetryTask(task_pb2.RetryTaskRequest(name=task.name), metadata=md("root"))
    events = [r for r in caplog.records if r.name == "agentmesh.audit"]
    summary = [(r.principal, r.action, r.outcome) for r in events]  # type: ignore[attr-defined]
    assert ("carol", "cancel", "denied") in summary
    assert ("root", "cancel", "allowed") in summary
    assert ("alice", "redrive", "denied") in summary
    assert ("root", "redrive", "ok") in summary
    assert ("alice", "cancel", "allowed") not in summary  # own work is no admin action
    record = next(r for r in events if r.action == "redrive"  # type: ignore[attr-defined]
                  and r.outcome == "ok")  # type: ignore[attr-defined]
    for field in ("principal", "role", "action", "resource", "namespace", "outcome"):
        assert hasattr(record, field), field
    assert record.resource == task.name  # type: ignore[attr-defined]
    assert record.namespace == "team-a"  # type: ignore[attr-defined]
    assert record.role == "admin"  # type: ignore[attr-defined]


# -- agent identity ------------------------------------------------------------------


async def register(d: discovery_pb2_grpc.DiscoveryServiceStub, who: str,
                   ns: str) -> discovery_pb2.RegisterAgentResponse:
    return await d.RegisterAgent(discovery_pb2.RegisterAgentRequest(agent=discovery_pb2.Agent(
        display_name=who, namespace=ns, max_concurrency=2,
        capabilities=[discovery_pb2.Capability(name="work")])), metadata=md(who))


async def test_agents_act_only_as_themselves(secured: Mesh,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agentmesh.audit")
    async with grpc.aio.insecure_channel(secured.address) as ch:
        d = discovery_pb2_grpc.DiscoveryServiceStub(ch)
        t = task_pb2_grpc.TaskServiceStub(ch)
        a = await register(d, "agent-a", "team-a")
        a2 = await register(d, "agent-a2", "team-a")
        assert await code_of(register(d, "agent-a", "team-b")) == DENIED

        # Another principal cannot open the agent's streams, even with its session token.
        beat = d.Heartbeat(metadata=md("agent-a2"))
        await beat.write(discovery_pb2.HeartbeatRequest(open=discovery_pb2.HeartbeatOpen(
            agent=a.agent.name, session_token=a.session_token)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await beat.read()
        assert err.value.code() == DENIED

        # The real agent opens its heartbeat stream (a work stream needs one), then
        # takes a task.
        own_beat = d.Heartbeat(metadata=md("agent-a"))
        await own_beat.write(discovery_pb2.HeartbeatRequest(open=discovery_pb2.HeartbeatOpen(
            agent=a.agent.name, session_token=a.session_token)))
        assert (await own_beat.read()).WhichOneof("kind") == "ack"
        work = t.ProcessTasks(metadata=md("agent-a"))
        await work.write(task_pb2.ProcessTasksRequest(open=task_pb2.ProcessTasksOpen(
            agent=a.agent.name, session_token=a.session_token)))
        assert (await work.read()).WhichOneof("kind") == "opened"
        await work.write(task_pb2.ProcessTasksRequest(credit=task_pb2.TaskCredit(count=1)))
        task = (await t.SubmitTask(submit("team-a"), metadata=md("alice"))).task
        async with asyncio.timeout(5):
            msg = await work.read()
        got = msg.assignment if msg.WhichOneof("kind") == "assignment" else \
            msg.assignments.assignments[0]
        assert got.task.name == task.name
        done = task_pb2.CompleteTaskRequest(task=task.name, fencing_token=got.fencing_token,
                                            output=common_pb2.Payload(data=b"1"))
        # Neither another agent principal nor a client may report its result.
        assert await code_of(t.CompleteTask(done, metadata=md("agent-a2"))) == DENIED
        assert await code_of(t.CompleteTask(done, metadata=md("agent-b"))) == \
            grpc.StatusCode.NOT_FOUND
        assert await code_of(t.CompleteTask(done, metadata=md("alice"))) == DENIED
        finished = await t.CompleteTask(done, metadata=md("agent-a"))
        assert finished.task.state == task_pb2.TASK_STATE_SUCCEEDED
        work.cancel()
        own_beat.cancel()

        # Deregistering another principal's agent: refused to agents, allowed (audited)
        # to admins, who need no session token.
        dereg = discovery_pb2.DeregisterAgentRequest(name=a2.agent.name,
                                                     session_token=a2.session_token)
        assert await code_of(d.DeregisterAgent(dereg, metadata=md("agent-a"))) == DENIED
        await d.DeregisterAgent(discovery_pb2.DeregisterAgentRequest(name=a2.agent.name),
                                metadata=md("root"))
        gone = await d.GetAgent(discovery_pb2.GetAgentRequest(name=a2.agent.name),
                                metadata=md("alice"))
        assert gone.agent.state == discovery_pb2.AGENT_STATE_GONE
        assert await code_of(d.GetAgent(discovery_pb2.GetAgentRequest(name=a2.agent.name),
                                        metadata=md("bob"))) == grpc.StatusCode.NOT_FOUND
    summary = [(r.principal, r.action, r.outcome)  # type: ignore[attr-defined]
               for r in caplog.records if r.name == "agentmesh.audit"]
    assert ("root", "deregister", "ok") in summary


# -- the SDK and the CLI --------------------------------------------------------------


async def test_sdk_tokens_end_to_end(secured: Mesh) -> None:
    agent = Agent("worker", target=secured.address, namespace="team-a",
                  token=TOKENS["agent-a"])

    @agent.handler("double")
    async def double(task: TaskContext) -> int:
        return int(task.input["n"]) * 2

    runner = asyncio.create_task(agent.run())
    try:
        async with MeshClient(secured.address, namespace="team-a",
                              token=TOKENS["alice"]) as client:
            task = await client.submit_task("double", {"n": 21})
            done = await client.wait_task(task.id, timeout=10)
            assert done.output == 42
        async with MeshClient(secured.address, namespace="team-b",
                              token=TOKENS["alice"]) as client:
            with pytest.raises(PermissionDeniedError):
                await client.submit_task("double", {"n": 1})
        config = ChannelConfig.secure(token=TOKENS["bob"])
        assert "token=***" in repr(config.interceptors[0])
    finally:
        await agent.stop(1.0)
        async with asyncio.timeout(10):
            await runner


def test_auth_file_validation(tmp_path: Path) -> None:
    good = {"name": "x", "role": "client", "namespaces": ["a"], "token_sha256": "0" * 64}
    assert len(TokenTable.parse({"principals": [good]})) == 1
    for bad in ({**good, "token": "clear"}, {**good, "role": "root"},
                {**good, "namespaces": []}, {**good, "namespaces": ["UPPER"]},
                {**good, "token_sha256": "abc"}, {**good, "name": ""}):
        with pytest.raises(AuthFileError):
            TokenTable.parse({"principals": [bad]})
    with pytest.raises(AuthFileError):
        TokenTable.parse({"principals": [good, {**good, "name": "y"}]})  # same token twice
    with pytest.raises(AuthFileError):
        TokenTable.load(tmp_path / "missing.yaml")
    table = TokenTable.parse({"principals": [{**good, "token_sha256": hash_token("s3cret")}]})
    principal = table.authenticate("s3cret")
    assert principal is not None and principal.name == "x"
    assert table.authenticate("S3cret") is None


def test_cli_hash_token(capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    import io  # noqa: PLC0415

    token = generate_token()
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert main(["auth", "hash-token", "--name", "ci", "--role", "agent",
                 "--namespace", "team-a"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    entry = doc["principals"][0]
    assert entry == {"name": "ci", "role": "agent", "namespaces": ["team-a"],
                     "token_sha256": hash_token(token)}
    assert token not in yaml.safe_dump(doc)
    assert len(TokenTable.parse(doc)) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["auth", "hash-token"]) == 2


# -- exposure warning and stream quotas ---------------------------------------------------


async def test_warns_when_exposed_without_auth(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server.app")
    async with running_server(embedded_settings(host="0.0.0.0")):
        pass
    assert any("without authentication" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with running_server(embedded_settings(a2a_port=free_port(), a2a_host="0.0.0.0")):
        pass  # gRPC on loopback, the A2A gateway exposed
    assert any("the A2A gateway listening on 0.0.0.0 without authentication" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    async with running_server(embedded_settings()):
        pass
    assert not any("SECURITY" in r.getMessage() for r in caplog.records)


async def test_watch_stream_limit() -> None:
    async with running_server(embedded_settings(max_watch_streams=2)) as mesh, \
            grpc.aio.insecure_channel(mesh.address) as ch:
        t = task_pb2_grpc.TaskServiceStub(ch)

        async def first_event(watch: Any) -> Any:
            """Submit until the watch shows a task (it is open on the server then)."""
            async def feed() -> None:
                while True:
                    await t.SubmitTask(submit("default"))
                    await asyncio.sleep(0.05)
            feeder = asyncio.ensure_future(feed())
            try:
                async with asyncio.timeout(10):
                    return await watch.read()
            finally:
                feeder.cancel()

        watches = [t.WatchTasks(task_pb2.WatchTasksRequest()) for _ in range(2)]
        for w in watches:
            assert (await first_event(w)).task.capability == "work"
        third = t.WatchTasks(task_pb2.WatchTasksRequest())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await third.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watches[0].cancel()
        async with asyncio.timeout(10):  # until the server has seen the cancel
            while True:
                again = t.WatchTasks(task_pb2.WatchTasksRequest())
                try:
                    got = await first_event(again)
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    continue
                assert got.task.capability == "work"
                break
        for w in (*watches, again):
            w.cancel()
