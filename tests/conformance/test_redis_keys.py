"""Every Redis key a deployment writes carries its hash tag ``{prefix}``.

That is what lets the same functions run on Redis Cluster: all keys of one
deployment hash to one slot, so every multi-key call is legal there. A whole
mesh runs a mixed workload (tasks, a workflow, a failure and a retry, a
cancel, agents, state, a lock) on the shared Redis under a fresh prefix; then
every key that mentions the prefix must start with ``{prefix}:``.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from agent_sdk import Agent, MeshClient, RetryPolicy, TaskContext
from server.app import running_server
from tests._services import require_redis, unique_prefix
from tests.conftest import embedded_settings


async def test_every_key_of_a_deployment_carries_its_hash_tag() -> None:
    url = require_redis()
    prefix = unique_prefix("keys")
    settings = embedded_settings(store=url, key_prefix=prefix)
    async with running_server(settings) as mesh:
        agent = Agent("keys-agent", target=mesh.address, max_concurrency=4)
        tries: dict[str, int] = {}

        @agent.handler("work")
        async def work(task: TaskContext) -> dict[str, int]:
            n = int(task.input["n"])
            tries[str(n)] = tries.get(str(n), 0) + 1
            if n == 3 and tries[str(n)] == 1:
                raise RuntimeError("flaky once (expected in this test's log)")  # a retry
            return {"n": n}

        runner = asyncio.ensure_future(agent.run())
        try:
            async with MeshClient(mesh.address) as client:
                fast = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
                tasks = [await client.submit_task("work", {"n": i}, retry=fast) for i in range(5)]
                for t in tasks:
                    done = await client.wait_task(t.name, timeout=30)
                    assert done.state == "SUCCEEDED", done
                wf = await client.submit_workflow({"steps": [
                    {"id": "a", "capability": "work", "input": {"n": 10}},
                    {"id": "b", "capability": "work", "input": {"n": 11}, "depends_on": ["a"]},
                ]})
                assert (await client.wait_workflow(wf.name, timeout=30)).state == "SUCCEEDED"
                idle = await client.submit_task("nobody-offers-this", {"n": 0})
                await client.cancel_task(idle.name, "test")
                await client.put_state("config/x", {"v": 1})
                token, _ = await client.acquire_lock("job")
                await client.release_lock("job", token)
        finally:
            await agent.stop(grace=1.0)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

        r = aioredis.from_url(url)
        try:
            keys = [k.decode() async for k in r.scan_iter(match=f"*{prefix}*", count=1000)]
            if keys:
                await r.delete(*keys)  # the shared Redis keeps nothing of this run
        finally:
            await r.aclose()
    assert len(keys) > 10, keys  # tasks, queues, indexes, agents, state, locks...
    untagged = [k for k in keys if not k.startswith("{" + prefix + "}:")]
    assert untagged == []
