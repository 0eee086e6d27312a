"""Workflow DAG validation: unique ids, known dependencies, no cycles."""

from __future__ import annotations

import re
from collections.abc import Sequence

from server.domain.errors import FieldViolation, InvalidArgumentError
from server.domain.models import WorkflowStep

STEP_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def validate_dag(steps: Sequence[WorkflowStep], max_steps: int = 1000) -> list[str]:
    """Check a workflow's steps and return the step ids in a topological order.

    Raises InvalidArgumentError naming the field: duplicate ids, unknown
    dependencies, self-dependencies, or a cycle (``a -> b -> c -> a``).
    """
    if not steps:
        raise InvalidArgumentError.field("workflow.steps", "a workflow needs at least one step")
    if len(steps) > max_steps:
        raise InvalidArgumentError.field(
            "workflow.steps", f"at most {max_steps} steps, got {len(steps)}")
    violations: list[FieldViolation] = []
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        if not STEP_ID_RE.match(step.id):
            violations.append(FieldViolation(
                f"workflow.steps[{i}].id",
                "must be 1-64 letters, digits, '-' or '_'"))
        elif step.id in seen:
            violations.append(FieldViolation(
                f"workflow.steps[{i}].id", f"duplicate step id {step.id!r}"))
        else:
            seen[step.id] = i
    for i, step in enumerate(steps):
        for j, dep in enumerate(step.depends_on):
            if dep == step.id:
                violations.append(FieldViolation(
                    f"workflow.steps[{i}].depends_on[{j}]",
                    f"step {step.id!r} depends on itself"))
            elif dep not in seen:
                violations.append(FieldViolation(
                    f"workflow.steps[{i}].depends_on[{j}]", f"unknown step {dep!r}"))
    if violations:
        raise InvalidArgumentError(
            "invalid workflow: " + "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations)
    deps = {s.id: tuple(dict.fromkeys(s.depends_on)) for s in steps}
    cycle = find_cycle(deps)
    if cycle:
        path = " -> ".join(cycle)
        raise InvalidArgumentError(
            f"workflow has a cycle: {path}",
            [FieldViolation("workflow.steps", f"cycle: {path}")],
            reason="WORKFLOW_CYCLE")
    return topological_order(deps)


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """Return one cycle as a closed path (``[a, b, a]``), or None.

    Iterative three-colour DFS, so deep chains cannot hit the recursion limit.
    Edges point from a step to the steps it depends on; the reported path
    follows dependency order (``a -> b`` means a depends on b).
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for root in deps:
        if colour[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        colour[root] = grey
        while stack:
            node, idx = stack[-1]
            children = deps[node]
            if idx < len(children):
                stack[-1] = (node, idx + 1)
                child = children[idx]
                if colour[child] == grey:
                    start = path.index(child)
                    return [*path[start:], child]
                if colour[child] == white:
                    colour[child] = grey
                    stack.append((child, 0))
                    path.append(child)
            else:
                colour[node] = black
                stack.pop()
                path.pop()
    return None


def topological_order(deps: dict[str, tuple[str, ...]]) -> list[str]:
    """Kahn's algorithm; dependencies come before their dependents."""
    remaining = {k: len(v) for k, v in deps.items()}
    dependents: dict[str, list[str]] = {k: [] for k in deps}
    for node, ds in deps.items():
        for d in ds:
            dependents[d].append(node)
    ready = [k for k, n in remaining.items() if n == 0]
    order: list[str] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for nxt in dependents[node]:
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                ready.append(nxt)
    return order
