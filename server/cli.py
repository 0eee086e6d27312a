"""The ``agentmesh`` command line.

``agentmesh serve`` runs the control plane (flags override ``AGENTMESH_*``
environment variables). Every other command is a thin client over
`agent_sdk.MeshClient`::

    agentmesh [--server HOST:PORT] [--namespace NS] [--json] [--timeout S] COMMAND ...

    agents list|get|watch|drain
    tasks submit|get|list|cancel|retry|watch|dead-letters|retry-all|cancel-all
    approvals list|approve|reject|input
    workflow run|get
    state get|put|list|delete
    stats

Output is an aligned plain-text table (or ``--json``). Any failure prints one
line, ``agentmesh: error: ...``, on stderr, never a traceback. Exit status:

    0    success
    1    failure (a refused call, an unreachable server, a task that failed...)
    2    bad usage or input (flags, settings, files)
    3    ``serve``: a port it must listen on (gRPC, metrics, console or A2A) is already in use
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import enum
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import yaml
from pydantic import ValidationError

from agent_sdk import (
    UNSET,
    AgentInfo,
    FailureInfo,
    MeshClient,
    StepInfo,
    TaskInfo,
    WorkflowInfo,
    WorkflowSpec,
    load_workflow_file,
)
from agent_sdk.errors import (
    InvalidArgumentError,
    NotFoundError,
    RPCError,
    TaskFailedError,
    WorkflowFailedError,
)
from server.settings import Settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PORT_IN_USE = 3
EXIT_INTERRUPTED = 130
EXIT_STATUS_HELP = ("exit status: 0 success, 1 failure, 2 bad usage or input, 3 serve: a port "
                    "(gRPC, metrics, console or A2A) is already in use, 130 interrupted")
EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success; with `--wait`, the task or workflow SUCCEEDED"),
    (EXIT_FAILURE, "failure: a task or workflow ended otherwise, `--wait` ran past "
                   "`--timeout`, an unknown id (NOT_FOUND), a server that cannot be reached "
                   "or refuses the call for any other reason"),
    (EXIT_USAGE, "bad usage or input: unknown command or flag, bad JSON or workflow file, "
                 "invalid settings, and input the server refuses as invalid "
                 "(INVALID_ARGUMENT: a workflow cycle, `--priority 5000`)"),
    (EXIT_PORT_IN_USE, "`serve`: a port (gRPC, metrics, console or A2A) is already in use"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
"""Every exit status of ``agentmesh`` (docs/reference/cli.md renders this table)."""
DEFAULT_TIMEOUT = 10.0
"""Deadline of each call when ``--timeout`` is not given."""

DEFAULT_SERVER = "127.0.0.1:50051"
PROG = "agentmesh"


class CLIError(Exception):
    """A failure reported as one line on stderr with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        """``status`` is the process exit status (2 for usage/input errors)."""
        super().__init__(message)
        self.message = message
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise `CLIError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise a one-line usage error (exit status 2)."""
        raise CLIError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


# ---------------------------------------------------------------- output helpers


def to_jsonable(value: Any) -> Any:
    """Convert SDK dataclasses (and what they hold) into JSON-serialisable values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return base64.b64encode(value).decode()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False))


def print_json_line(value: Any) -> None:
    """Print ``value`` as one compact JSON line (for streams) and flush."""
    print(json.dumps(to_jsonable(value), ensure_ascii=False, separators=(",", ":")), flush=True)


def compact(value: Any, width: int = 60) -> str:
    """A one-line rendering of a payload, cut to ``width`` characters."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(to_jsonable(value),
                                                          ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def fmt_time(value: datetime | None) -> str:
    """A timestamp as local ``YYYY-MM-DD HH:MM:SS`` ("" when unset)."""
    return "" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_age(value: datetime | None) -> str:
    """How long ago, ``1.2s ago`` ("never" when unset): a hung agent's beat age grows."""
    if value is None:
        return "never"
    seconds = max(0.0, (datetime.now(value.tzinfo) - value).total_seconds())
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def short_name(name: str) -> str:
    """``tasks/abc`` -> ``abc``: the id part of a resource name."""
    return name.rsplit("/", 1)[-1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as aligned plain-text columns under upper-case headers."""
    cells = [[str(h).upper() for h in headers]] + [["" if c is None else str(c) for c in r]
                                                    for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    """Print ``key: value`` lines with aligned values; multi-line values are indented."""
    width = max(len(k) for k, _ in pairs) + 1
    for key, value in pairs:
        text = "" if value is None else str(value)
        lines = text.splitlines() or [""]
        print(f"{key + ':':<{width}} {lines[0]}".rstrip())
        for line in lines[1:]:
            print(" " * (width + 1) + line)


def pretty(value: Any) -> str:
    """A payload as indented JSON (strings as they are)."""
    if isinstance(value, str):
        return value
    return json.dumps(to_jsonable(value), indent=2, ensure_ascii=False)


class _ReadableDumper(yaml.SafeDumper):
    """YAML for people: multi-line strings as literal blocks, not "...\\n..."."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ReadableDumper.add_representer(str, _str_block)


def readable(value: Any) -> str:
    """A result for reading (``workflow run --wait``): a string as it is, anything
    else as block YAML whose multi-line strings keep their lines."""
    if isinstance(value, str):
        return value
    text: str = yaml.dump(to_jsonable(value), Dumper=_ReadableDumper, sort_keys=False,
                          allow_unicode=True, default_flow_style=False, width=1_000_000)
    return text.rstrip("\n")


def parse_json_arg(text: str, option: str) -> Any:
    """Parse a JSON argument or raise a usage error naming ``option``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"invalid JSON for {option}: {exc}", EXIT_USAGE) from None


def parse_value(text: str) -> Any:
    """A state value: JSON when it parses, otherwise the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, option: str) -> float:
    """Unix seconds of ``--since``/``--until``: ISO 8601 (naive means UTC) or an age
    such as ``90s``, ``15m``, ``2h``, ``1d`` (that long ago)."""
    value = text.strip()
    unit = _DURATION_UNITS.get(value[-1:].lower())
    if unit is not None and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now().timestamp() - float(value[:-1]) * unit
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise CLIError(f"invalid time for {option}: {text!r} (ISO 8601 like "
                       "2026-01-31T03:00, or an age like 15m, 2h, 1d)", EXIT_USAGE) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_labels(values: Sequence[str] | None, option: str = "--label") -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict (a usage error names the bad one)."""
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"invalid {option} {item!r}: expected KEY=VALUE", EXIT_USAGE)
        out[key] = value
    return out


def task_filter_args(args: argparse.Namespace) -> dict[str, Any]:
    """The filter flags of ``tasks list``/``retry-all``/``cancel-all`` as SDK arguments."""
    return {"state": args.state.upper() if args.state else None,
            "capability": args.capability or "", "workflow": args.workflow or "",
            "labels": parse_labels(args.label),
            "created_after": parse_time(args.since, "--since") if args.since else 0.0,
            "created_before": parse_time(args.until, "--until") if args.until else 0.0}


def _labels(value: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(value.items()))


def _failure(failure: FailureInfo | None) -> str:
    if failure is None:
        return ""
    return f"{failure.error_type}: {failure.message}"


# ---------------------------------------------------------------- agents


def _agent_name(agent: AgentInfo) -> str:
    return str(agent.display_name or short_name(agent.name))


async def cmd_agents_list(client: MeshClient, args: argparse.Namespace) -> int:
    """``agents list``: the registered agents."""
    state = args.state.upper() if args.state else None
    agents = await client.list_agents(capability=args.capability or "", state=state)
    if args.json:
        print_json(agents)
        return EXIT_OK
    print_table(["name", "state", "capabilities", "in-flight", "load", "version", "last beat"],
                [[_agent_name(a), a.state, ",".join(a.capabilities),
                  f"{a.in_flight}/{a.max_concurrency}", f"{a.load:.2f}", a.version,
                  fmt_age(a.heartbeat_time)] for a in agents])
    return EXIT_OK


async def find_agent(client: MeshClient, name: str) -> AgentInfo:
    """The agent with id ``name`` (or "agents/{id}"), else the live one with that display name.

    A display name may hold any text, so a name that is not even a valid id
    (INVALID_ARGUMENT) is looked up as a display name too.
    """
    try:
        return await client.get_agent(name)
    except (NotFoundError, InvalidArgumentError):
        matches = [a for a in await client.list_agents() if a.display_name == name]
        if len(matches) != 1:
            raise
        return matches[0]


async def agent_names(client: MeshClient, wanted: Iterable[str] = ()) -> dict[str, str]:
    """Display names of the live agents by resource name ("agents/{id}"), and of
    gone ones too when one of ``wanted`` is not live (a task's agent may have left)."""
    names = {a.name: a.display_name for a in await client.list_agents() if a.display_name}
    if any(w and w not in names for w in wanted):
        names.update({a.name: a.display_name for a in await client.list_agents(state="GONE")
                      if a.display_name and a.name not in names})
    return names


async def cmd_agents_get(client: MeshClient, args: argparse.Namespace) -> int:
    """``agents get NAME``: one agent in detail (by id or display name)."""
    agent = await find_agent(client, args.name)
    if args.json:
        print_json(agent)
        return EXIT_OK
    print_fields([("name", agent.name), ("display name", agent.display_name),
                  ("id", agent.id), ("state", agent.state),
                  ("capabilities", ", ".join(agent.capabilities)),
                  ("in flight", f"{agent.in_flight}/{agent.max_concurrency}"),
                  ("load", f"{agent.load:.2f}"), ("version", agent.version),
                  ("labels", _labels(agent.labels)),
                  ("registered", fmt_time(agent.register_time)),
                  ("heartbeat", fmt_time(agent.heartbeat_time))])
    return EXIT_OK


async def cmd_agents_drain(client: MeshClient, args: argparse.Namespace) -> int:
    """``agents drain NAME``: the agent takes no new work and is told to finish and leave."""
    found = await find_agent(client, args.name)
    agent = await client.drain_agent(found.name, reason=args.reason or "",
                                     grace_period=args.grace or 0.0)
    if args.json:
        print_json(agent)
    else:
        print(f"agent {_agent_name(agent)} {agent.state}")
    return EXIT_OK


async def cmd_agents_watch(client: MeshClient, args: argparse.Namespace) -> int:
    """``agents watch``: one line per join/update/leave until Ctrl-C."""
    async for event in client.watch_agents(capability=args.capability or ""):
        if args.json:
            print_json_line(event)
            continue
        agent = event.agent
        print(f"{fmt_time(datetime.now())}  {event.type:<8} {_agent_name(agent)}  "
              f"{agent.state}  [{','.join(agent.capabilities)}]  "
              f"in-flight {agent.in_flight}/{agent.max_concurrency}", flush=True)
    return EXIT_OK


# ---------------------------------------------------------------- tasks


def _agent_label(agent: str, names: Mapping[str, str]) -> str:
    """The display name of an "agents/{id}" when known, else the id."""
    return names.get(agent) or short_name(agent)


def print_task(task: TaskInfo, names: Mapping[str, str]) -> None:
    """One task in detail; ``names`` maps agent resource names to display names."""
    pairs: list[tuple[str, Any]] = [
        ("id", task.id), ("capability", task.capability), ("state", task.state),
        ("attempt", task.attempt), ("agent", _agent_label(task.agent, names)),
        ("priority", task.priority)]
    if task.workflow:
        pairs += [("workflow", short_name(task.workflow)), ("step", task.step_id)]
    if task.labels:
        pairs.append(("labels", _labels(task.labels)))
    if task.unschedulable:
        pairs.append(("unschedulable", "yes: no live agent offers this capability"))
    if task.served_by_fallback:
        pairs.append(("fallback", "served by the fallback capability"))
    if task.human_intervened:
        pairs.append(("human", "re-driven by a human"))
    pairs += [("created", fmt_time(task.create_time)), ("updated", fmt_time(task.update_time))]
    if task.end_time is not None:
        pairs.append(("ended", fmt_time(task.end_time)))
    if task.failure is not None:
        # A RUNNING, QUEUED or SUCCEEDED task's failure is an earlier attempt's.
        label = "failure" if _current_failure(task) else "last failure"
        pairs.append((label, _failure(task.failure)))
    pairs += [("input", pretty(task.input))]
    if task.state == "SUCCEEDED":
        pairs.append(("output", pretty(task.output)))
    print_fields(pairs)


_FAILURE_STATES = frozenset({"RETRYING", "FAILED", "DEAD_LETTERED", "CANCELLED"})
"""States whose failure column is their own (the attempt that just failed, or the end)."""
UNSCHEDULABLE_LEGEND = "* unschedulable: no live agent offers the capability"


def print_tasks(tasks: Sequence[TaskInfo], names: Mapping[str, str]) -> None:
    """Tasks as a table (an unschedulable state is starred, with a legend under it)."""
    starred = [not t.done and t.unschedulable for t in tasks]
    print_table(["id", "capability", "state", "attempt", "agent", "step", "updated", "failure"],
                [[t.id, t.capability, t.state + ("*" if star else ""), t.attempt,
                  _agent_label(t.agent, names), t.step_id, fmt_time(t.update_time),
                  compact(_current_failure(t), 50)]
                 for t, star in zip(tasks, starred, strict=True)])
    if any(starred):
        print(f"\n{UNSCHEDULABLE_LEGEND}")


async def _show_task(client: MeshClient, task: TaskInfo, args: argparse.Namespace) -> None:
    if args.json:
        print_json(task)
    else:
        print_task(task, await agent_names(client, [task.agent]))


async def _show_tasks(client: MeshClient, tasks: list[TaskInfo],
                      args: argparse.Namespace) -> None:
    if args.json:
        print_json(tasks)
    else:
        print_tasks(tasks, await agent_names(client, (t.agent for t in tasks)))


async def cmd_tasks_submit(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks submit CAPABILITY``: queue a task, optionally wait for its result."""
    value = parse_json_arg(args.input, "--input") if args.input is not None else None
    task = await client.submit_task(args.capability, value, priority=args.priority,
                                    request_id=args.request_id or "")
    if not args.json:
        # SubmitTask answers before any agent is asked; a read says whether one can take it.
        task = await client.get_task(task.name)
    if not args.wait:
        if args.json:
            print_json(task)
        else:
            print(f"task {task.id} {task.state}{_unschedulable_note(task)}")
        return EXIT_OK
    if not args.json:  # the id at once, so a wait that never ends still names its task
        print(f"task {task.id} {task.state}{_unschedulable_note(task)}; waiting for the "
              f"result{f' (up to {args.timeout:g} s)' if args.timeout else ''}", flush=True)
    try:
        task = await client.wait_task(task.name, timeout=args.timeout)
    except TimeoutError:
        task = await client.get_task(task.name)
        raise CLIError(f"task {task.id} still {task.state} after {args.timeout:g} s"
                       f"{_unschedulable_note(task)}") from None
    await _show_task(client, task, args)
    if task.state != "SUCCEEDED":
        raise CLIError(f"task {task.id} ended {task.state}: {_failure(task.failure)}".rstrip(
            ": "))
    return EXIT_OK


def _unschedulable_note(task: TaskInfo) -> str:
    """" (unschedulable: ...)" for a task no live agent can take, else ""."""
    if task.unschedulable and not task.done:
        return f" (unschedulable: no live agent offers {task.capability!r})"
    return ""


def _current_failure(task: TaskInfo | StepInfo) -> str:
    """The failure a task's (or step's) state is about: a RUNNING or QUEUED attempt
    has none of its own (the failure of an earlier attempt is not this one's)."""
    if task.failure is None or not task.state.endswith(tuple(_FAILURE_STATES)):
        return ""
    return _failure(task.failure)


async def cmd_tasks_get(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks get ID``: one task in detail."""
    await _show_task(client, await client.get_task(args.id), args)
    return EXIT_OK


async def cmd_tasks_list(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks list``: tasks filtered by state, capability, workflow, labels and time."""
    tasks = await client.list_tasks(limit=args.limit, **task_filter_args(args))
    await _show_tasks(client, tasks, args)
    return EXIT_OK


async def cmd_tasks_dead_letters(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks dead-letters``: tasks whose retries ran out (a human must act)."""
    tasks = await client.list_tasks(state="DEAD_LETTERED", limit=args.limit)
    await _show_tasks(client, tasks, args)
    return EXIT_OK


async def cmd_tasks_cancel(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks cancel ID``: cancel a task that has not ended."""
    task = await client.cancel_task(args.id, reason=args.reason or "")
    if args.json:
        print_json(task)
    else:
        print(f"task {task.id} {task.state}")
    return EXIT_OK


async def cmd_tasks_retry(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks retry ID``: re-drive a failed or dead-lettered task."""
    if args.input is None:
        task = await client.retry_task(args.id)
    else:
        task = await client.retry_task(args.id, input=parse_json_arg(args.input, "--input"))
    if args.json:
        print_json(task)
    else:
        print(f"task {task.id} {task.state} (attempt {task.attempt})")
    return EXIT_OK


async def _bulk(client: MeshClient, args: argparse.Namespace, verb: str) -> int:
    """``tasks retry-all`` / ``cancel-all``: preview, confirm, act, report."""
    flt = task_filter_args(args)
    extra: dict[str, Any] = {"reason": args.reason or ""} if verb == "cancel" else {}
    act = client.bulk_retry_tasks if verb == "retry" else client.bulk_cancel_tasks
    if not (args.dry_run or args.yes):
        if not sys.stdin.isatty():
            raise CLIError(f"{verb}-all acts on every matching task: pass --yes to confirm "
                           "(or --dry-run to list them)", EXIT_USAGE)
        preview = await act(max_tasks=args.max, dry_run=True, **flt, **extra)
        more = " (and more: the limit --max cut the list)" if preview.truncated else ""
        answer = await asyncio.to_thread(input, f"{verb} {len(preview.names)} task(s){more}? "
                                         "[y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CLIError("not confirmed; nothing changed", EXIT_FAILURE)
    result = await act(max_tasks=args.max, dry_run=args.dry_run, **flt, **extra)
    if args.json:
        print_json(result)
        return EXIT_OK
    done = "would be " if args.dry_run else ""
    past = "re-driven" if verb == "retry" else "cancelled"
    for name in result.names:
        print(short_name(name))
    tail = "; more matched (run it again)" if result.truncated else ""
    print(f"{len(result.names)} task(s) {done}{past}{tail}", file=sys.stderr)
    return EXIT_OK


async def cmd_tasks_retry_all(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks retry-all``: re-drive every dead letter (or failed/cancelled task) matching."""
    return await _bulk(client, args, "retry")


async def cmd_tasks_cancel_all(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks cancel-all``: cancel every matching task that has not ended."""
    return await _bulk(client, args, "cancel")


async def cmd_tasks_watch(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks watch [ID...]``: one line per task change; with ids, stop once all ended."""
    if args.chunks:
        if len(args.ids) != 1:
            raise CLIError("--chunks watches exactly one task ID", EXIT_USAGE)
        return await _watch_chunks(client, args)
    if args.after:
        raise CLIError("--after needs --chunks", EXIT_USAGE)
    printed: dict[str, str] = {}
    names = {} if args.json else await agent_names(client)

    def show(task: TaskInfo) -> None:
        if printed.get(task.id) != task.state or not task.done:
            printed[task.id] = task.state
            _print_task_change(task, args, names)

    async def stream() -> None:
        async for task in client.watch_tasks(names=args.ids):
            show(task)

    if not args.ids:
        await stream()
        return EXIT_OK
    async with asyncio.TaskGroup() as group:
        printer = group.create_task(stream())
        for task in await asyncio.gather(*(client.get_task(i) for i in args.ids)):
            show(task)
        # wait_task subscribes before it reads, so an end is never missed.
        try:
            ended = await asyncio.gather(*(client.wait_task(i, timeout=args.timeout)
                                           for i in args.ids))
        except TimeoutError:
            printer.cancel()
            still = [t for t in await asyncio.gather(*(client.get_task(i) for i in args.ids))
                     if not t.done]
            raise CLIError(f"{', '.join(f'{t.id} still {t.state}' for t in still)} after "
                           f"{args.timeout:g} s") from None
        printer.cancel()
    for task in ended:
        show(task)
    return EXIT_OK


async def _watch_chunks(client: MeshClient, args: argparse.Namespace) -> int:
    """``tasks watch ID --chunks``: the task's changes and its chunks, in order.

    Text chunks are printed as they come (no newline of their own); artifact
    pieces and progress notes get a line each, tagged with their sequence so
    that ``--after SEQ`` resumes exactly after the last one seen.
    """
    if not 0 <= args.after < 1 << 63:  # a sequence number is an int64
        raise CLIError("--after must be a sequence number (0 or more)", EXIT_USAGE)
    names = {} if args.json else await agent_names(client)
    inline = False
    chunks_since = False  # chunks printed since the last task line
    last: TaskInfo | None = None
    async for item in client.watch_chunks(args.ids[0], after_sequence=args.after):
        if args.json:
            print_json_line(item)
            if isinstance(item, TaskInfo):
                last = item
            continue
        if isinstance(item, TaskInfo):
            if inline:
                print(flush=True)
                inline = False
            if last is None or (last.state, last.attempt) != (item.state, item.attempt) \
                    or (item.done and chunks_since):
                _print_task_change(item, args, names)
                chunks_since = False
            last = item
            continue
        chunks_since = True
        if item.kind == "TEXT":
            print(item.text, end="", flush=True)
            inline = True
        else:
            if inline:
                print(flush=True)
                inline = False
            what = (f"progress {item.progress * 100:.0f}% {item.text}" if item.kind == "PROGRESS"
                    else f"artifact {item.artifact}{' (last)' if item.last else ''}: "
                         f"{compact(item.data)}")
            print(f"#{item.sequence}  {what}", flush=True)
    if inline:
        print(flush=True)
    return EXIT_OK if last is None or last.state == "SUCCEEDED" else EXIT_FAILURE


def _print_task_change(task: TaskInfo, args: argparse.Namespace,
                       names: Mapping[str, str]) -> None:
    if args.json:
        print_json_line(task)
        return
    agent = f" on {_agent_label(task.agent, names)}" if task.agent else ""
    failure = _current_failure(task)
    tail = f"  {failure}" if failure else ""
    if task.state == "SUCCEEDED":
        tail = f"  -> {compact(task.output)}"
    print(f"{fmt_time(task.update_time)}  {task.id}  {task.capability}  {task.state}"
          f"{_unschedulable_note(task)}  attempt {task.attempt}{agent}{tail}", flush=True)


# ---------------------------------------------------------------- workflows


def load_workflow(path: str) -> WorkflowSpec:
    """Load a workflow YAML file; a missing file or bad YAML is a usage error."""
    try:
        return load_workflow_file(path)
    except FileNotFoundError:
        raise CLIError(f"workflow file not found: {path}", EXIT_USAGE) from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    except (ValueError, yaml.YAMLError) as exc:  # the message names the file and the field
        raise CLIError(f"invalid workflow file: {exc}", EXIT_USAGE) from None


def _leaf_steps(workflow: WorkflowInfo) -> list[StepInfo]:
    """Steps no other step depends on: where the final results are."""
    needed = {dep for step in workflow.steps for dep in step.depends_on}
    return [step for step in workflow.steps if step.id not in needed]


def print_workflow(workflow: WorkflowInfo) -> None:
    """One workflow in detail with a table of its steps."""
    pairs: list[tuple[str, Any]] = [("workflow", short_name(workflow.name)),
                                    ("name", workflow.display_name), ("state", workflow.state),
                                    ("created", fmt_time(workflow.create_time))]
    if workflow.end_time is not None:
        pairs.append(("ended", fmt_time(workflow.end_time)))
    if workflow.failure_reason:
        pairs.append(("failure", workflow.failure_reason))
    print_fields(pairs)
    print()
    print_table(["step", "capability", "depends on", "state", "task", "output / failure"],
                [[s.id, s.capability, ",".join(s.depends_on),
                  s.state + (" (unschedulable)" if s.unschedulable else ""),
                  short_name(s.task) if s.task else "",
                  compact(s.output, 50) if s.state == "SUCCEEDED"
                  else compact(_current_failure(s), 50)] for s in workflow.steps])


def _step_line(step: StepInfo) -> str:
    line = f"  [{step.id}] {step.capability}: {step.state}"
    if step.unschedulable and not step.state.endswith(("SUCCEEDED", "FAILED", "CANCELLED")):
        line += " (unschedulable: no live agent offers it)"
    failure = _current_failure(step)
    if failure:
        line += f" - {failure}"
    return line


async def follow_workflow(client: MeshClient, name: str, *, quiet: bool) -> WorkflowInfo:
    """Watch a workflow until it ends, printing a line per step change unless ``quiet``."""
    seen: dict[str, tuple[str, bool]] = {}
    last: WorkflowInfo | None = None
    async for workflow in client.watch_workflow(name):
        last = workflow
        for step in workflow.steps:
            key = (step.state, bool(step.unschedulable))
            if seen.get(step.id) != key:
                seen[step.id] = key
                if not quiet:
                    print(_step_line(step), flush=True)
        if workflow.done:
            return workflow
    if last is None or not last.done:
        last = await client.wait_workflow(name)
    return last


async def cmd_workflow_run(client: MeshClient, args: argparse.Namespace) -> int:
    """``workflow run FILE``: submit a workflow; with --wait follow it to the end."""
    spec = load_workflow(args.file)
    workflow = await client.submit_workflow(spec, request_id=args.request_id or "")
    if not args.wait:
        if args.json:
            print_json(workflow)
        else:
            print(f"workflow {short_name(workflow.name)} {workflow.state}")
        return EXIT_OK
    if not args.json:
        print(f"workflow {short_name(workflow.name)} ({workflow.display_name}) started",
              flush=True)
    try:
        async with asyncio.timeout(args.timeout):
            workflow = await follow_workflow(client, workflow.name, quiet=args.json)
    except TimeoutError:
        workflow = await client.get_workflow(workflow.name)
        raise CLIError(f"workflow {short_name(workflow.name)} still {workflow.state} after "
                       f"{args.timeout:g} s") from None
    if args.json:
        print_json(workflow)
    else:
        print(f"workflow {short_name(workflow.name)} {workflow.state}")
        if workflow.state == "SUCCEEDED":
            for step in _leaf_steps(workflow):
                print(f"\n== {step.id} ==")
                print(readable(step.output))
    if workflow.state != "SUCCEEDED":
        reason = workflow.failure_reason or "no reason given"
        raise CLIError(f"workflow {short_name(workflow.name)} ended {workflow.state}: {reason}")
    return EXIT_OK


async def cmd_workflow_get(client: MeshClient, args: argparse.Namespace) -> int:
    """``workflow get NAME``: a workflow and its steps."""
    workflow = await client.get_workflow(args.name)
    if args.json:
        print_json(workflow)
    else:
        print_workflow(workflow)
    return EXIT_OK


# ---------------------------------------------------------------- state


async def cmd_state_get(client: MeshClient, args: argparse.Namespace) -> int:
    """``state get KEY``: print the value (JSON)."""
    entry = await client.get_state(args.key)
    if entry is None:
        raise CLIError(f"NOT_FOUND: state key {args.key!r} not found")
    if args.json:
        print_json(entry)
    else:
        print(pretty(entry.value))
    return EXIT_OK


async def cmd_state_put(client: MeshClient, args: argparse.Namespace) -> int:
    """``state put KEY VALUE``: write a value (compare-and-set with --expected-version)."""
    entry = await client.put_state(args.key, parse_value(args.value),
                                   expected_version=args.expected_version, ttl=args.ttl)
    if args.json:
        print_json(entry)
    else:
        print(f"{entry.key} version {entry.version}")
    return EXIT_OK


async def cmd_state_list(client: MeshClient, args: argparse.Namespace) -> int:
    """``state list [PREFIX]``: keys under a prefix."""
    entries = await client.list_state(args.prefix, limit=args.limit)
    if args.json:
        print_json(entries)
        return EXIT_OK
    print_table(["key", "version", "updated", "expires", "value"],
                [[e.key, e.version, fmt_time(e.update_time), fmt_time(e.expire_time),
                  compact(e.value, 50)] for e in entries])
    return EXIT_OK


async def cmd_state_delete(client: MeshClient, args: argparse.Namespace) -> int:
    """``state delete KEY``: remove a key (the server answers NOT_FOUND when it is absent)."""
    revision = await client.delete_state(args.key, expected_version=args.expected_version)
    if args.json:
        print_json({"key": args.key, "revision": revision})
    else:
        print(f"deleted {args.key} (revision {revision})")
    return EXIT_OK


# ---------------------------------------------------------------- snapshots


async def cmd_snapshot_create(client: MeshClient, args: argparse.Namespace) -> int:
    """``snapshot create [--only-namespace NS]``: write a snapshot to the blob store."""
    snap = await client.create_snapshot(args.only_namespace)
    if args.json:
        print_json(snap)
    else:
        print(f"created {snap.name} ({snap.size_bytes} bytes, {snap.entry_count} keys, "
              f"{snap.task_count} tasks, {snap.workflow_count} workflows)")
    return EXIT_OK


async def cmd_snapshot_list(client: MeshClient, args: argparse.Namespace) -> int:
    """``snapshot list``: stored snapshots."""
    snaps = await client.list_snapshots()
    if args.json:
        print_json(snaps)
        return EXIT_OK
    print_table(["name", "created", "bytes", "keys", "tasks", "workflows"],
                [[s.name, fmt_time(s.create_time), s.size_bytes, s.entry_count, s.task_count,
                  s.workflow_count] for s in snaps])
    return EXIT_OK


async def cmd_snapshot_restore(client: MeshClient, args: argparse.Namespace) -> int:
    """``snapshot restore NAME``: load a snapshot into an empty store."""
    snap = await client.restore_snapshot(args.name)
    if args.json:
        print_json(snap)
    else:
        print(f"restored {snap.name} ({snap.entry_count} keys, {snap.task_count} tasks)")
    return EXIT_OK


# ---------------------------------------------------------------- stats


async def cmd_stats(client: MeshClient, args: argparse.Namespace) -> int:
    """``stats``: tasks by state, autonomy and live agents."""
    stats = await client.stats()
    if args.json:
        print_json(stats)
        return EXIT_OK
    by_state = dict(stats.tasks_by_state)
    print_table(["state", "tasks"], [[s, n] for s, n in sorted(by_state.items())])
    print()
    print_fields([
        ("autonomy", f"{stats.autonomy * 100:.1f}% ({stats.tasks_succeeded_autonomously} of "
                     f"{stats.tasks_ended} ended tasks succeeded with no human action)"
         if stats.tasks_ended else "n/a (no task has ended yet)"),
        ("live agents", stats.agents_live)])
    return EXIT_OK


# ---------------------------------------------------------------- serve

_SERVE_FLAGS: tuple[tuple[str, str, type[Any], str], ...] = (
    ("--host", "host", str, "address to bind (AGENTMESH_HOST)"),
    ("--port", "port", int, "gRPC port, 0 picks a free one (AGENTMESH_PORT)"),
    ("--store", "store", str, "memory://, redis://host:port/db or "
     "redis+cluster://host:port,host:port (AGENTMESH_STORE)"),
    ("--durability", "durability", str, "Redis writes acknowledged after: auto, none or "
     "replicas:N (AGENTMESH_DURABILITY)"),
    ("--bus", "bus", str, "memory://, nats://host:port[,host:port] or amqp://...[?queue_type="
     "quorum] (AGENTMESH_BUS)"),
    ("--blob", "blob", str, "snapshot directory or s3://bucket/prefix (AGENTMESH_BLOB)"),
    ("--s3-endpoint", "s3_endpoint", str, "S3-compatible endpoint URL (AGENTMESH_S3_ENDPOINT)"),
    ("--console-port", "console_port", int,
     "web console port, 0 turns it off; default 8470 with the memory store, off with a "
     "shared store (AGENTMESH_CONSOLE_PORT)"),
    ("--console-host", "console_host", str,
     "address of the web console (AGENTMESH_CONSOLE_HOST)"),
    ("--metrics-port", "metrics_port", int,
     "Prometheus /metrics port, 0 disables it (AGENTMESH_METRICS_PORT)"),
    ("--metrics-host", "metrics_host", str,
     "address of the /metrics endpoint, 0.0.0.0 in a container (AGENTMESH_METRICS_HOST)"),
    ("--a2a-port", "a2a_port", int,
     "A2A gateway HTTP port, 0 disables it; default 41241 in embedded mode, off with "
     "--store redis (AGENTMESH_A2A_PORT)"),
    ("--a2a-host", "a2a_host", str, "address of the A2A gateway; default --host "
     "(AGENTMESH_A2A_HOST)"),
    ("--a2a-public-url", "a2a_public_url", str,
     "URL the A2A agent card advertises, behind a proxy (AGENTMESH_A2A_PUBLIC_URL)"),
    ("--gauge-interval", "gauge_interval", float,
     "seconds between queue/agent gauge refreshes (AGENTMESH_GAUGE_INTERVAL)"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING... (AGENTMESH_LOG_LEVEL)"),
    ("--heartbeat-interval", "heartbeat_interval", float,
     "seconds between agent heartbeats (AGENTMESH_HEARTBEAT_INTERVAL)"),
    ("--drain-grace", "drain_grace", float,
     "seconds to wait for in-flight work on shutdown (AGENTMESH_DRAIN_GRACE)"),
    ("--auth-file", "auth_file", str,
     "YAML file of principals with hashed tokens; enables authentication "
     "(AGENTMESH_AUTH_FILE)"),
    ("--tls-cert", "tls_cert", str, "PEM server certificate chain; enables TLS "
     "(AGENTMESH_TLS_CERT)"),
    ("--tls-key", "tls_key", str, "PEM server private key (AGENTMESH_TLS_KEY)"),
    ("--tls-client-ca", "tls_client_ca", str,
     "PEM CA of client certificates; requires and verifies them, mTLS "
     "(AGENTMESH_TLS_CLIENT_CA)"),
)


def _with_default(text: str, dest: str) -> str:
    """A serve flag's help with the setting's default, "(AGENTMESH_PORT; default 50051)".

    The flags default to None (unset: the environment or the setting's default
    applies), so argparse cannot show the default itself. Texts that already say
    what their default depends on, and settings with no default, stay as written.
    """
    default = Settings.model_fields[dest].default
    if default is None or default == "" or "default" in text:
        return text
    shown = default.get_secret_value() if hasattr(default, "get_secret_value") else default
    if text.endswith(")"):
        return f"{text[:-1]}; default {shown})"
    return f"{text} (default {shown})"


def build_settings(args: argparse.Namespace) -> Settings:
    """`Settings` from the environment, overridden by the flags that were given."""
    overrides: dict[str, Any] = {dest: getattr(args, dest)
                                 for _, dest, _, _ in _SERVE_FLAGS
                                 if getattr(args, dest) is not None}
    if args.log_format is not None:
        overrides["log_format"] = args.log_format
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: "
                             f"{err['msg']}" for err in exc.errors())
        raise CLIError(f"invalid settings: {problems}", EXIT_USAGE) from None


def run_serve(args: argparse.Namespace) -> int:
    """``serve``: run the control plane until SIGTERM/SIGINT, then drain."""
    # Imported here: the backends behind server.app are only needed by `serve`.
    from server.app import serve  # noqa: PLC0415
    from server.netutil import PortInUseError  # noqa: PLC0415
    from server.observability.logging import configure_logging  # noqa: PLC0415

    settings = build_settings(args)
    try:
        configure_logging(settings.log_format, settings.log_level)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    try:
        asyncio.run(serve(settings))
    except PortInUseError as exc:  # another agentmesh (or anything) has it: say which port
        raise CLIError(str(exc), EXIT_PORT_IN_USE) from None
    except OSError as exc:
        raise CLIError(f"cannot serve on {settings.host}:{settings.port}: {exc}") from None
    except ValueError as exc:  # an unknown --store or --bus scheme, a bad auth file
        raise CLIError(str(exc), EXIT_USAGE) from None
    return EXIT_OK


# ---------------------------------------------------------------- auth


def run_auth(args: argparse.Namespace) -> int:
    """``auth hash-token``: print the SHA-256 of a token (read from stdin) for the auth file.

    With ``--generate`` a new random token is made and printed once, with the
    auth-file entry; the server only ever stores the hash.
    """
    from server.api.auth import MIN_TOKEN_LENGTH, generate_token, hash_token  # noqa: PLC0415

    if args.generate:
        token = generate_token()
    else:
        token = sys.stdin.readline().strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise CLIError(f"a token needs at least {MIN_TOKEN_LENGTH} characters; use "
                           "--generate for a random one", EXIT_USAGE)
    digest = hash_token(token)
    if args.json:
        out: dict[str, Any] = {"token_sha256": digest}
        if args.generate:
            out["token"] = token
        print_json(out)
        return EXIT_OK
    if args.generate:
        print(f"token (shown once; give it to the caller): {token}")
    entry = {"name": args.name or "CHANGE-ME", "role": args.role,
             "namespaces": args.namespaces or ["default"], "token_sha256": digest}
    print(yaml.safe_dump({"principals": [entry]}, sort_keys=False).rstrip())
    return EXIT_OK


# ---------------------------------------------------------------- parser

if TYPE_CHECKING:  # what add_subparsers() returns (generic only in the stubs)
    _Commands = argparse._SubParsersAction[_Parser]

Command = Callable[[MeshClient, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(prog=PROG, description="Control plane and client of an agentmesh fleet.",
                     epilog=EXIT_STATUS_HELP)
    parser.add_argument("--server", default=os.environ.get("AGENTMESH_SERVER", DEFAULT_SERVER),
                        help="HOST:PORT of the control plane (env AGENTMESH_SERVER, "
                             f"default {DEFAULT_SERVER})")
    parser.add_argument("--namespace", default=os.environ.get("AGENTMESH_NAMESPACE", "default"),
                        help="namespace (env AGENTMESH_NAMESPACE, default 'default')")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    parser.add_argument("--timeout", type=float, default=None,
                        help="deadline of each call in seconds (default 10); with --wait or "
                             "watch IDs, also the longest wait for the end")
    parser.add_argument("--token", default=os.environ.get("AGENTMESH_TOKEN"),
                        help="bearer token of the caller (env AGENTMESH_TOKEN)")
    parser.add_argument("--tls-ca", dest="client_tls_ca",
                        default=os.environ.get("AGENTMESH_TLS_CA"),
                        help="PEM CA that signed the server certificate; enables TLS "
                             "(env AGENTMESH_TLS_CA)")
    parser.add_argument("--tls-cert", dest="client_tls_cert",
                        default=os.environ.get("AGENTMESH_CLIENT_TLS_CERT"),
                        help="PEM client certificate for mTLS (env AGENTMESH_CLIENT_TLS_CERT)")
    parser.add_argument("--tls-key", dest="client_tls_key",
                        default=os.environ.get("AGENTMESH_CLIENT_TLS_KEY"),
                        help="PEM client key for mTLS (env AGENTMESH_CLIENT_TLS_KEY)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the control plane",
                                epilog=EXIT_STATUS_HELP)
    for flag, dest, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, dest=dest, type=kind, default=None,
                           help=_with_default(text, dest))
    serve.add_argument("--log-format", choices=["json", "console"], default=None,
                       help=_with_default("log format (AGENTMESH_LOG_FORMAT)", "log_format"))

    auth = _group(commands, "auth", "manage tokens of the auth file (offline)")
    p = auth.add_parser("hash-token", help="hash a token read from stdin (or --generate one)")
    p.add_argument("--generate", action="store_true", help="generate a random token")
    p.add_argument("--name", help="principal name for the printed entry")
    p.add_argument("--role", choices=["agent", "client", "admin", "viewer"], default="client")
    p.add_argument("--namespace", dest="namespaces", action="append",
                   help="namespace of the principal (repeatable; \"*\" for all)")

    _add_agents(commands)
    _add_tasks(commands)
    _add_approvals(commands)
    _add_workflow(commands)
    _add_state(commands)
    _add_snapshot(commands)
    stats = commands.add_parser("stats", help="tasks by state, autonomy, live agents")
    stats.set_defaults(handler=cmd_stats)
    return parser


def _wait_timeout_flag(p: argparse.ArgumentParser) -> None:
    """``--timeout`` after a waiting command too (``tasks submit X --wait --timeout 2``):
    the same setting as the global flag, which it overrides when given."""
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                   help="longest wait for the end in seconds, and the deadline of each call "
                        "(the global --timeout)")


def _group(commands: _Commands, name: str, text: str) -> _Commands:
    group = commands.add_parser(name, help=text)
    return group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def _add_agents(commands: _Commands) -> None:
    sub = _group(commands, "agents", "list, inspect and watch agents")
    p = sub.add_parser("list", help="list agents")
    p.add_argument("--capability", help="only agents offering this capability")
    p.add_argument("--state", choices=["active", "draining", "gone"], type=str.lower)
    p.set_defaults(handler=cmd_agents_list)
    p = sub.add_parser("get", help="show one agent")
    p.add_argument("name")
    p.set_defaults(handler=cmd_agents_get)
    p = sub.add_parser("watch", help="stream agent joins, updates and departures")
    p.add_argument("--capability", help="only agents offering this capability")
    p.set_defaults(handler=cmd_agents_watch)
    p = sub.add_parser("drain", help="drain one agent: no new work, finish and leave (admin)")
    p.add_argument("name")
    p.add_argument("--reason")
    p.add_argument("--grace", type=float, help="seconds the agent may take (default: the "
                   "server's drain grace)")
    p.set_defaults(handler=cmd_agents_drain)


_TASK_STATES = ["pending", "queued", "running", "succeeded", "failed", "cancelled",
                "retrying", "dead_lettered"]


def _add_tasks(commands: _Commands) -> None:
    sub = _group(commands, "tasks", "submit, inspect and manage tasks")
    p = sub.add_parser("submit", help="queue a task")
    p.add_argument("capability")
    p.add_argument("--input", help="task input as JSON")
    p.add_argument("--priority", type=int, default=0, help="-1000..1000, higher runs first")
    p.add_argument("--request-id", help="idempotency key: a repeat returns the first task")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it")
    _wait_timeout_flag(p)
    p.set_defaults(handler=cmd_tasks_submit)
    p = sub.add_parser("get", help="show one task")
    p.add_argument("id")
    p.set_defaults(handler=cmd_tasks_get)
    p = sub.add_parser("list", help="list tasks")
    _filter_flags(p)
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=cmd_tasks_list)
    p = sub.add_parser("cancel", help="cancel a task")
    p.add_argument("id")
    p.add_argument("--reason")
    p.set_defaults(handler=cmd_tasks_cancel)
    p = sub.add_parser("retry", help="re-drive a failed or dead-lettered task")
    p.add_argument("id")
    p.add_argument("--input", help="replacement input as JSON")
    p.set_defaults(handler=cmd_tasks_retry)
    p = sub.add_parser("watch", help="stream task changes (given ids: until they end)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--chunks", action="store_true",
                   help="one ID: also print its streamed chunks (text inline) until it ends")
    p.add_argument("--after", type=int, default=0, metavar="SEQ",
                   help="with --chunks: resume after this chunk sequence number")
    _wait_timeout_flag(p)
    p.set_defaults(handler=cmd_tasks_watch)
    p = sub.add_parser("dead-letters", help="list dead-lettered tasks")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=cmd_tasks_dead_letters)
    for verb, handler, text in (
            ("retry-all", cmd_tasks_retry_all,
             "re-drive every matching task (default state: dead_lettered; admin)"),
            ("cancel-all", cmd_tasks_cancel_all,
             "cancel every matching task that has not ended (admin)")):
        p = sub.add_parser(verb, help=text)
        _filter_flags(p)
        p.add_argument("--max", type=int, default=0,
                       help="most tasks to act on (default 1000, at most 10000)")
        p.add_argument("--dry-run", action="store_true", help="only list what would change")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if verb == "cancel-all":
            p.add_argument("--reason")
        p.set_defaults(handler=handler)


def _filter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", choices=_TASK_STATES,
                   type=lambda s: s.lower().replace("-", "_"))
    p.add_argument("--capability")
    p.add_argument("--workflow")
    p.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="only tasks with this label (repeat: all must match)")
    p.add_argument("--since", help="created at or after: ISO 8601 (UTC) or an age (15m, 2h)")
    p.add_argument("--until", help="created before: ISO 8601 (UTC) or an age (15m, 2h)")


def _add_approvals(commands: _Commands) -> None:
    sub = _group(commands, "approvals", "tasks waiting for a person: list, approve, reject, "
                 "answer")
    p = sub.add_parser("list", help="tasks waiting for a person now")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=cmd_approvals_list)
    for name, helptext in (("approve", "approve: the task succeeds, its workflow goes on"),
                           ("reject", "reject: the task fails (REJECTED), so does its workflow"),
                           ("input", "answer with a value (its output downstream)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("id")
        p.add_argument("--comment", default="", help="why (audited)")
        if name == "input":
            p.add_argument("--value", required=True, help="the answer as JSON")
        elif name == "approve":
            p.add_argument("--input", help="extra data passed on, as JSON")
        p.add_argument("--as", dest="approver", default="",
                       help="who decides, recorded when the server runs without auth "
                            "(default: $USER)")
        p.set_defaults(handler=cmd_approvals_decide, decision=name)


async def cmd_approvals_list(client: MeshClient, args: argparse.Namespace) -> int:
    """``approvals list``: tasks waiting for a person."""
    tasks = await client.list_approvals(limit=args.limit)
    if args.json:
        print_json(tasks)
    else:
        print_table(["task", "workflow", "step", "waiting since", "input"],
                    [[t.id, t.workflow.removeprefix("workflows/"), t.step_id,
                      fmt_time(t.update_time), compact(t.input)] for t in tasks])
    return EXIT_OK


async def cmd_approvals_decide(client: MeshClient, args: argparse.Namespace) -> int:
    """``approvals approve|reject|input ID``: a person's decision (audited)."""
    who = args.approver or os.environ.get("USER", "")
    if args.decision == "approve":
        extra = parse_json_arg(args.input, "--input") if args.input is not None else UNSET
        task = await client.approve(args.id, comment=args.comment, input=extra, approver=who)
    elif args.decision == "reject":
        task = await client.reject(args.id, comment=args.comment, approver=who)
    else:
        task = await client.supply_input(args.id, parse_json_arg(args.value, "--value"),
                                         comment=args.comment, approver=who)
    if args.json:
        print_json(task)
    else:
        print(f"task {task.id} {task.state}")
    return EXIT_OK


def _add_workflow(commands: _Commands) -> None:
    sub = _group(commands, "workflow", "run and inspect workflows")
    p = sub.add_parser("run", help="submit a workflow from a YAML file")
    p.add_argument("file")
    p.add_argument("--wait", action="store_true",
                   help="follow the steps; exit 0 only when the workflow succeeds")
    p.add_argument("--request-id", help="idempotency key")
    _wait_timeout_flag(p)
    p.set_defaults(handler=cmd_workflow_run)
    p = sub.add_parser("get", help="show a workflow and its steps")
    p.add_argument("name")
    p.set_defaults(handler=cmd_workflow_get)


def _add_state(commands: _Commands) -> None:
    sub = _group(commands, "state", "read and write shared state")
    p = sub.add_parser("get", help="print a value")
    p.add_argument("key")
    p.set_defaults(handler=cmd_state_get)
    p = sub.add_parser("put", help="write a value (JSON, or a plain string)")
    p.add_argument("key")
    p.add_argument("value")
    p.add_argument("--expected-version", type=int, help="compare-and-set: fail unless current")
    p.add_argument("--ttl", type=float, help="seconds until the key expires")
    p.set_defaults(handler=cmd_state_put)
    p = sub.add_parser("list", help="list keys")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(handler=cmd_state_list)
    p = sub.add_parser("delete", help="delete a key")
    p.add_argument("key")
    p.add_argument("--expected-version", type=int, help="compare-and-set: fail unless current")
    p.set_defaults(handler=cmd_state_delete)


def _add_snapshot(commands: _Commands) -> None:
    sub = _group(commands, "snapshot", "create, list and restore snapshots")
    p = sub.add_parser("create", help="snapshot state and task records to the blob store")
    p.add_argument("--only-namespace", default="",
                   help="only this namespace's state (default: every namespace)")
    p.set_defaults(handler=cmd_snapshot_create)
    p = sub.add_parser("list", help="list stored snapshots")
    p.set_defaults(handler=cmd_snapshot_list)
    p = sub.add_parser("restore", help="load a snapshot into an empty store")
    p.add_argument("name")
    p.set_defaults(handler=cmd_snapshot_restore)


# ---------------------------------------------------------------- entry point


def describe_rpc_error(code: grpc.StatusCode, message: str, server: str) -> str:
    """One line for a failed call; an unreachable server says so plainly."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"UNAVAILABLE: cannot reach the agentmesh server at {server} ({message})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"DEADLINE_EXCEEDED: no answer from {server} in time ({message})"
    return f"{code.name}: {message}"


def _rpc_status(code: grpc.StatusCode) -> int:
    """Input the server refuses as invalid is bad input (2); any other refusal fails (1)."""
    return EXIT_USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILURE


def describe_error(exc: BaseException, server: str) -> tuple[str, int]:
    """The one-line message and exit status of an exception that ended a command."""
    if isinstance(exc, BaseExceptionGroup):  # from a TaskGroup: report the first failure
        return describe_error(exc.exceptions[0], server)
    if isinstance(exc, CLIError):
        return exc.message, exc.status
    if isinstance(exc, RPCError):
        return describe_rpc_error(exc.code, exc.message, server), _rpc_status(exc.code)
    if isinstance(exc, grpc.aio.AioRpcError):
        return (describe_rpc_error(exc.code(), exc.details() or "", server),
                _rpc_status(exc.code()))
    if isinstance(exc, TaskFailedError | WorkflowFailedError):
        return str(exc), EXIT_FAILURE
    if isinstance(exc, TimeoutError):
        return "timed out", EXIT_FAILURE
    return f"{type(exc).__name__}: {exc}", EXIT_FAILURE


def report_error(exc: BaseException, server: str) -> int:
    """Print the one-line error of ``exc`` on stderr; return the exit status."""
    message, status = describe_error(exc, server)
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


async def run_command(args: argparse.Namespace) -> int:
    """Run a parsed client command on the running loop; errors become one stderr line."""
    try:
        if args.timeout is not None and args.timeout <= 0:
            raise CLIError("--timeout must be positive", EXIT_USAGE)
        handler: Command = args.handler
        async with MeshClient(args.server, namespace=args.namespace,
                              timeout=args.timeout or DEFAULT_TIMEOUT,
                              token=args.token or None, tls_ca=args.client_tls_ca,
                              tls_cert=args.client_tls_cert,
                              tls_key=args.client_tls_key) as client:
            return await handler(client, args)
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, never a traceback
        return report_error(exc, args.server)


def _exit_status(exc: SystemExit) -> int:
    """The status of argparse's own exit (``--help`` exits 0)."""
    return exc.code if isinstance(exc.code, int) else EXIT_USAGE


async def main_async(argv: list[str] | None = None) -> int:
    """`main` for a caller that already runs an event loop (client commands only).

    gRPC's asyncio stack wants one event loop per process, so code that runs
    its own loop (tests, notebooks) calls this rather than `main`.
    """
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            raise CLIError("serve runs its own event loop: use main()", EXIT_USAGE)
        if args.command == "auth":
            return run_auth(args)
    except SystemExit as exc:
        return _exit_status(exc)
    except CLIError as exc:
        return report_error(exc, DEFAULT_SERVER)
    return await run_command(args)


def main(argv: list[str] | None = None) -> int:
    """Run the ``agentmesh`` command line; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "auth":
            return run_auth(args)
        return asyncio.run(run_command(args))
    except SystemExit as exc:
        return _exit_status(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, never a traceback
        return report_error(exc, DEFAULT_SERVER)


if __name__ == "__main__":
    sys.exit(main())
