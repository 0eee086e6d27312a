"""JSON replies, the one mapping of errors to HTTP statuses, and query parsing.

Bad input is a 400 whose body names the field (``{"error": {"code":
"INVALID_ARGUMENT", "message": ..., "field": "labels"}}``), the same
violations the gRPC API reports; nothing a browser sends can produce a 500
with a traceback (unknown exceptions are logged and answered generically).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import orjson
from aiohttp import web

from server.api import convert
from server.api.errors import status_code_of
from server.domain.errors import (
    AgentMeshError,
    InvalidArgumentError,
)
from server.domain.models import TaskState
from server.ports import TaskFilter

log = logging.getLogger(__name__)

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
"""gRPC code -> HTTP status. Which code a domain error is stays with
``server.api.errors.status_code_of`` (the one owner); this only says how the
console's HTTP answers it."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(body: Any, status: int = 200) -> web.Response:
    """A JSON response (orjson: fast for the 100-row pages)."""
    return web.Response(body=orjson.dumps(body), status=status,
                        content_type="application/json")


def error_reply(exc: AgentMeshError) -> web.Response:
    """The JSON error of a domain error."""
    code = status_code_of(exc)
    status = _HTTP_STATUS.get(code, 500)
    body: dict[str, Any] = {"code": code.name, "message": exc.message, "reason": exc.reason}
    if isinstance(exc, InvalidArgumentError) and exc.violations:
        body["field"] = exc.violations[0].field
        body["message"] = f"{exc.violations[0].field}: {exc.violations[0].description}"
        body["violations"] = [{"field": v.field, "description": v.description}
                              for v in exc.violations]
    return reply({"error": body}, status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every domain error becomes its JSON reply; anything else a generic 500 (logged)."""
    try:
        return await handler(request)
    except AgentMeshError as exc:
        return error_reply(exc)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("console request %s %s failed", request.method, request.path)
        return reply({"error": {"code": "INTERNAL", "message": "internal error (logged)",
                                "reason": "INTERNAL"}}, 500)


def bad(field: str, description: str) -> InvalidArgumentError:
    """A 400 naming the field."""
    return InvalidArgumentError.field(field, description)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (400 unless it is one)."""
    if request.content_length and request.content_length > 1 << 20:
        raise bad("body", "at most 1 MiB")
    raw = await request.read()
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad("body", f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise bad("body", "expected a JSON object")
    return value


# -- query parameters --------------------------------------------------------------

def text(request: web.Request, name: str, max_len: int = 256) -> str:
    """A string parameter (empty when absent)."""
    value = request.query.get(name, "").strip()
    if len(value) > max_len:
        raise bad(name, f"at most {max_len} characters")
    return value


def integer(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within ``low..high``."""
    raw = request.query.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad(name, f"{raw[:40]!r} is not a whole number") from None
    if not low <= value <= high:
        raise bad(name, f"must be between {low} and {high}")
    return value


def namespace(request: web.Request) -> str:
    """The namespace a page shows (``default`` when absent)."""
    return convert.namespace(text(request, "namespace"), "namespace")


def parse_state(raw: str, field: str = "state") -> TaskState | None:
    """A task state by name (case-insensitive), None when empty."""
    if not raw:
        return None
    try:
        return TaskState[raw.upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(s.name for s in TaskState)
        raise bad(field, f"unknown state {raw[:40]!r}; one of {names}") from None


def parse_labels(raw: str, field: str = "label") -> dict[str, str]:
    """``key=value`` pairs separated by commas: every pair must match."""
    out: dict[str, str] = {}
    for part in raw.split(","):
        item = part.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise bad(field, f"{item[:60]!r} is not key=value (several: a=1,b=2)")
        out[key.strip()] = value.strip()
    return convert.labels(out, field, convert.Limits())


def parse_time(raw: str, field: str) -> float:
    """Unix seconds of an ISO 8601 time (naive means UTC) or of an age: 90s, 15m, 2h, 1d."""
    if not raw:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    unit = units.get(raw[-1:].lower())
    if unit is not None:
        try:
            age = float(raw[:-1])
        except ValueError:
            age = math.nan
        if math.isfinite(age) and age >= 0:
            return datetime.now(UTC).timestamp() - age * unit
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise bad(field, f"{raw[:40]!r} is not a time: use ISO 8601 (2026-01-31T03:00) "
                  "or an age (15m, 2h, 1d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def task_filter(ns: str, values: Any, *, state: TaskState | None = None) -> TaskFilter:
    """A TaskFilter from query parameters or a JSON body (same names: state,
    capability, label, since, until, workflow); each bad value is a 400 naming it."""
    def get(name: str) -> str:
        value = values.get(name, "")
        if not isinstance(value, str):
            raise bad(name, "expected a string")
        if len(value) > 1024:
            raise bad(name, "at most 1024 characters")
        return value.strip()

    chosen = state if state is not None else parse_state(get("state"))
    after, before = parse_time(get("since"), "since"), parse_time(get("until"), "until")
    if after and before and after >= before:
        raise bad("until", "must be later than since")
    workflow = get("workflow")
    return TaskFilter(
        ns, chosen, convert.capability(get("capability"), "capability", required=False),
        convert.resource_id(workflow, "workflows", "workflow") if workflow else "",
        parse_labels(get("label")), after, before)
