"""A small autonomous research team built with the agentmesh SDK.

Four roles, five agent processes' worth of work (run here as five `Agent`
instances in one process):

- ``planner`` offers ``plan``: splits a topic into two research angles.
- ``researcher-1`` and ``researcher-2`` both offer ``research``: each returns
  deterministic findings for the angle named in its step input. With
  ``max_concurrency=1`` each, the two research steps run in parallel on the
  two instances.
- ``writer`` offers ``write``: combines the research outputs it receives from
  its upstream steps into a draft.
- ``reviewer`` offers ``review``: checks the draft and returns a verdict and
  the final text.

Everything is deterministic and offline; small random sleeps (at most 50 ms)
only make progress visible. Run the team against a server of your own::

    agentmesh serve &
    python examples/agents.py --server 127.0.0.1:50051
    agentmesh workflow run examples/research_report.yaml --wait

or let ``examples/run.py`` do all of it in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import signal
import sys
from collections.abc import Iterable
from typing import Any

from agent_sdk import Agent, MeshClient, TaskContext
from agent_sdk.errors import NonRetryableError, RetryableError

#: Names of the agents `build_team` creates.
TEAM = ("planner", "researcher-1", "researcher-2", "writer", "reviewer")

#: The two research angles, in the order the report presents them.
ANGLES = ("history", "applications")

_FINDINGS: dict[str, tuple[str, ...]] = {
    "history": (
        "The first ideas behind {topic} came out of university research labs.",
        "Early {topic} deployments were hand-built and ran on a single machine.",
        "Open standards in the 2000s let different {topic} implementations interoperate.",
        "Cheap commodity hardware turned {topic} from a niche into an everyday tool.",
        "Each generation of {topic} traded some simplicity for scale.",
    ),
    "applications": (
        "Logistics companies use {topic} to route deliveries in real time.",
        "Hospitals apply {topic} to schedule scarce staff and equipment.",
        "Game studios rely on {topic} to keep millions of players in sync.",
        "Banks run {topic} to detect fraud while a payment is in flight.",
        "Researchers use {topic} to share experiments across institutions.",
    ),
}


async def _think() -> None:
    """A short random pause (10-50 ms) so progress is visible; results do not depend on it."""
    await asyncio.sleep(random.uniform(0.01, 0.05))


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def plan(task: TaskContext) -> dict[str, Any]:
    """``plan``: split ``input.topic`` into two research angles (a synchronous handler)."""
    topic = str(_mapping(task.input).get("topic") or "multi-agent systems")
    return {
        "topic": topic,
        "angles": {
            "history": f"How did {topic} come to be?",
            "applications": f"Where is {topic} used today?",
        },
    }


def findings_for(topic: str, angle: str, count: int = 3) -> list[str]:
    """Deterministic findings: the same topic and angle always give the same list."""
    if angle not in _FINDINGS:
        raise NonRetryableError(f"unknown research angle {angle!r}; expected one of {ANGLES}")
    seed = int.from_bytes(hashlib.sha256(f"{topic}/{angle}".encode()).digest()[:8], "big")
    picked = random.Random(seed).sample(_FINDINGS[angle], count)
    return [line.format(topic=topic) for line in picked]


def make_research(researcher: str, *, flaky: bool = False) -> Any:
    """The ``research`` handler of one researcher instance.

    The angle comes from the step input (``{"angle": "history"}``); the topic
    and the question come from the upstream ``plan`` output. With ``flaky``,
    the first attempt at the history angle fails with a retryable error, to
    show the retry policy at work.
    """

    async def research(task: TaskContext) -> dict[str, Any]:
        await _think()
        given = _mapping(task.input)
        planned = _mapping(task.upstream.get("plan"))
        angle = str(given.get("angle") or "")
        topic = str(planned.get("topic") or given.get("topic") or "multi-agent systems")
        if flaky and angle == "history" and task.attempt == 1:
            raise RetryableError("the archive did not answer in time", "ArchiveTimeout")
        question = _mapping(planned.get("angles")).get(angle, f"{angle} of {topic}")
        return {"angle": angle, "topic": topic, "question": question,
                "findings": findings_for(topic, angle), "by": researcher}

    return research


async def write(task: TaskContext) -> dict[str, Any]:
    """``write``: combine the upstream research outputs into a draft."""
    await _think()
    research = [r for r in map(_mapping, task.upstream.values()) if "findings" in r]
    angles = sorted(r["angle"] for r in research)
    if angles != sorted(ANGLES):
        raise NonRetryableError(f"the writer needs research on {ANGLES}, got {angles}")
    research.sort(key=lambda r: ANGLES.index(r["angle"]))
    topic = research[0]["topic"]
    sections = [f"## {r['angle'].title()}\n{r['question']}\n" +
                "\n".join(f"- {line}" for line in r["findings"]) for r in research]
    draft = f"# {topic}: a short report\n\n" + "\n\n".join(sections)
    return {"topic": topic, "draft": draft, "words": len(draft.split())}


async def review(task: TaskContext) -> dict[str, Any]:
    """``review``: check the upstream draft; return a verdict and the final text."""
    await _think()
    drafts = [d for d in map(_mapping, task.upstream.values()) if "draft" in d]
    if not drafts:
        raise NonRetryableError("the reviewer got no draft from upstream")
    draft = str(drafts[0]["draft"])
    checks = {
        "has a title": draft.startswith("# "),
        "covers history": "## History" in draft,
        "covers applications": "## Applications" in draft,
        "at least 40 words": len(draft.split()) >= 40,
    }
    approved = all(checks.values())
    verdict = "approved" if approved else "changes requested"
    text = draft + ("\n\nReviewed: approved for publication." if approved else "")
    return {"verdict": verdict, "checks": checks, "text": text}


def build_team(target: str, *, namespace: str = "default", flaky: bool = False) -> list[Agent]:
    """Planner, two researchers, writer and reviewer, connected to ``target``."""
    planner = Agent("planner", target=target, namespace=namespace, version="1.0")
    planner.handler("plan")(plan)
    team = [planner]
    for number in (1, 2):
        name = f"researcher-{number}"
        researcher = Agent(name, target=target, namespace=namespace, max_concurrency=1,
                           labels={"role": "researcher"}, version="1.0")
        researcher.handler("research")(make_research(name, flaky=flaky))
        team.append(researcher)
    writer = Agent("writer", target=target, namespace=namespace, version="1.0")
    writer.handler("write")(write)
    reviewer = Agent("reviewer", target=target, namespace=namespace, version="1.0")
    reviewer.handler("review")(review)
    return [*team, writer, reviewer]


async def wait_for_agents(client: MeshClient, names: Iterable[str]) -> None:
    """Return once every named agent is registered and active (watched, not polled)."""
    missing = set(names)
    if not missing:
        return
    async for event in client.watch_agents(include_existing=True):
        if event.agent.state == "ACTIVE":
            missing.discard(event.agent.display_name)
        if not missing:
            return


async def _serve_team(target: str, namespace: str) -> None:
    team = build_team(target, namespace=namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with asyncio.TaskGroup() as group:
        for agent in team:
            group.create_task(agent.run(install_signal_handlers=False))
        print(f"team of {len(team)} agents connected to {target}; Ctrl-C to stop", flush=True)
        await stop.wait()
        await asyncio.gather(*(agent.stop(grace=5.0) for agent in team))


def main() -> int:
    """Run the team against an existing server until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of agentmesh")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args()
    asyncio.run(_serve_team(args.server, args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
