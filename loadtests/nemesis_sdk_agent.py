"""An SDK agent for the nemesis campaign that records every execution.

    python loadtests/nemesis_sdk_agent.py --targets A,B --name sdk0 --log sdk0.jsonl

It serves the capabilities ``work`` and ``step`` with :class:`agent_sdk.Agent`
and writes one JSON line per event to ``--log`` (flushed at once, so a SIGKILL
loses nothing already written): ``registered`` (from the SDK's own log record
of each new session), ``exec_start`` (task, fencing token, attempt, agent id),
``report`` (the result or failure the handler hands to the SDK, written just
before it is returned, so its time is a lower bound of the send), ``ack`` (a
refusal the server sent back: the SDK logs STALE_LEASE / NOT_RUNNING acks) and
``cancelled``.

Outputs are unique per execution: ``{"agent", "p", "task", "token"}``
(canonical JSON, sorted keys), so the checker can tell which execution's
result a task kept. Task inputs steer the handler: ``ms`` (how long it runs),
``fail`` (``"first"``: a retryable failure on attempt 1; ``"always"``: a
non-retryable failure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

CODE = Path(os.environ.get("NEMESIS_CODE_ROOT") or Path(__file__).resolve().parents[1])
sys.path[:0] = [str(CODE), str(CODE / "gen")]

from agent_sdk import Agent, NonRetryableError, RetryableError, TaskContext  # noqa: E402


class Recorder:
    """Append-only JSON lines, flushed per line."""

    def __init__(self, path: str, src: str) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._src = src

    def write(self, ev: str, **fields: object) -> None:
        """One event."""
        self._f.write(json.dumps({"t": time.time(), "src": self._src, "type": "agent",
                                  "ev": ev, **fields}) + "\n")
        self._f.flush()


class _SdkLogCapture(logging.Handler):
    """Turns the SDK's own log records of sessions and refused reports into events."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__(logging.DEBUG)
        self._rec = rec

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        msg = str(record.msg)
        if msg.startswith("agent %s registered as %s") and len(args) >= 2:
            self._rec.write("registered", agent=str(args[1]), pid=os.getpid())
        elif msg.startswith("result for %s (token %d) refused") and len(args) >= 3:
            outcome = "STALE_LEASE" if args[2] == "stale lease" else "NOT_RUNNING"
            self._rec.write("ack", task=str(args[0]), token=int(args[1]), outcome=outcome)
        elif msg.startswith("agent %s: session lost") and len(args) >= 2:
            self._rec.write("session_lost", reason=str(args[1])[:200])


def build(args: argparse.Namespace, rec: Recorder) -> Agent:
    """The agent with its recorded handlers."""
    agent = Agent(args.name, target=args.targets.split(","), max_concurrency=args.concurrency)

    async def handle(ctx: TaskContext) -> dict[str, Any]:
        me = agent.agent_name
        extra: dict[str, Any] = {}
        if ctx.step_id:
            extra["upstream"] = {k: json.dumps(v, sort_keys=True)
                                 for k, v in ctx.upstream.items()}
        rec.write("exec_start", task=ctx.name, token=ctx.fencing_token, attempt=ctx.attempt,
                  agent=me, **extra)
        spec = ctx.input if isinstance(ctx.input, dict) else {}
        try:
            await asyncio.sleep(float(spec.get("ms", 20)) / 1000.0)
        except asyncio.CancelledError:
            rec.write("cancelled", task=ctx.name, token=ctx.fencing_token, agent=me)
            raise
        fail = spec.get("fail")
        if fail == "always" or (fail == "first" and ctx.attempt == 1):
            message = f"nemesis failure by {me} under token {ctx.fencing_token}"
            rec.write("report", task=ctx.name, token=ctx.fencing_token, agent=me,
                      kind="failure", output=message, via="sdk")
            if fail == "always":
                raise NonRetryableError(message, "NemesisFailure")
            raise RetryableError(message, "NemesisTransient")
        output = {"agent": me, "p": args.name, "task": ctx.name, "token": ctx.fencing_token}
        rec.write("report", task=ctx.name, token=ctx.fencing_token, agent=me, kind="result",
                  output=json.dumps(output, sort_keys=True), via="sdk")
        return output

    agent.handler("work")(handle)
    agent.handler("step")(handle)
    return agent


async def main() -> None:
    """Serve until SIGTERM/SIGINT (or SIGKILL)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    rec = Recorder(args.log, args.name)
    sdk_log = logging.getLogger("agent_sdk")
    sdk_log.setLevel(logging.INFO)
    sdk_log.addHandler(_SdkLogCapture(rec))
    sdk_log.propagate = False
    rec.write("started", pid=os.getpid())
    watchdog = asyncio.create_task(_exit_when_stdin_closes())
    try:
        await build(args, rec).run(install_signal_handlers=True)
    finally:
        watchdog.cancel()


async def _exit_when_stdin_closes() -> None:
    """The driver holds our stdin: when it closes (the driver died), exit at once."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        pass
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
